"""Executors: the ways a plan runs, as one table looked up by name, and the entry points the
custom ops call (forward, backward, block selection, attention under a selection).

| name | tensors | what runs |
| --- | --- | --- |
| ``triton`` | CUDA | the generated Triton kernels, compiled |
| ``interpret`` | CPU | the same kernels under the Triton interpreter (tests) |
| ``torch`` | CPU | the block-sparse CPU path over ATen's fused attention kernel |
| ``reference`` | any | the exact dense attention from the plan (the oracle) |

Plans with soft-capped or ALiBi scores run the exact dense attention on ``torch`` (ATen's kernel
takes neither). ``auto`` picks by device (:data:`AUTO`). An executor with a kernel ``target`` also selects blocks
with the Triton estimator and attends under a selection with the kernels over run-time block
tables; the others select with the torch reference and attend under a selection densely.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attncc.codegen.backward.launch import attention_bwd
from attncc.codegen.backward.reference import attention_backward_reference
from attncc.codegen.common import check_inputs
from attncc.codegen.decode import table as decode_table
from attncc.codegen.decode.launch import decode_fwd
from attncc.codegen.decode.torch_path import decode_torch_forward
from attncc.codegen.forward.launch import attention_fwd
from attncc.codegen.forward.reference import attention_reference
from attncc.codegen.nonfinite import with_nonfinite_keys
from attncc.codegen.selectors import run as selectors
from attncc.codegen.selectors.layout import selection_shape
from attncc.codegen.torch_exec import attention_torch_backward, attention_torch_forward
from attncc.ir import masks as M
from attncc.ir.documents import SameDocument
from attncc.ir.plan import AttentionPlan

Tensor = torch.Tensor
Forward = Callable[[AttentionPlan, Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]
#: (plan, q, k, v, out, lse, dout, mask) -> (dq, dk, dv)
Backward = Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Executor:
    """One way to run a plan: ``forward`` and ``backward`` of static plans, the device type its
    tensors live on (None: any), and the kernel ``target`` it runs Triton kernels on (None: it
    runs none, and selections are computed by the torch reference and applied densely)."""

    name: str
    device: str | None
    target: str | None
    forward: Forward
    backward: Backward
    description: str
    #: forward of calls that take the decode path (few queries; None: ``forward`` runs them)
    decode: Forward | None = None

    def check_device(self, device: torch.device) -> None:
        if self.device is not None and device.type != self.device:
            hint = {"cuda": "use 'interpret' or 'torch' on CPU", "cpu": "use 'triton' or 'reference' on CUDA"}
            raise ValueError(
                f"executor '{self.name}' runs on {self.device.upper()} tensors, got {device} "
                f"({hint.get(self.device, 'use reference')})"
            )


def _reference_backward(plan, q, k, v, out, lse, dout, mask):
    return attention_backward_reference(plan, q, k, v, dout, None, mask)


def _kernels(name: str, device: str, target: str, description: str) -> Executor:
    """An executor of the generated Triton kernels for ``target``."""
    fwd, bwd = functools.partial(attention_fwd, target=target), functools.partial(attention_bwd, target=target)
    return Executor(name, device, target, fwd, bwd, description, functools.partial(decode_fwd, target=target))


def _dense_score_mods(fast: Callable, dense: Callable) -> Callable:
    """``fast`` (the CPU path over ATen's fused attention, which takes no score modification), or
    ``dense`` (the exact attention) for plans with soft-capping or ALiBi."""

    @functools.wraps(fast)
    def run(plan: AttentionPlan, *args):
        return (dense if plan.score_mod is not None else fast)(plan, *args)

    return run


def _documents_per_row(fn: Callable) -> Callable:
    """``fn`` (the CPU path: static masks only) for plans over packed documents: per batch element,
    the plan with every program intersected with that row's documents (a mask node whose block
    bounds come from the ids), so empty cross-document blocks are skipped as for any static mask;
    the row's tables are prepared once per distinct ids."""

    @functools.wraps(fn)
    def run(plan: AttentionPlan, *args):
        if plan.mask_kind != "documents":
            return fn(plan, *args)
        *tensors, ids = args
        outs = []
        for b in range(tensors[0].shape[0]):
            row = ids[b if ids.shape[0] > 1 else 0]
            one = [t[b : b + 1] for t in tensors]
            runs = _document_runs(row) if _runs_apply(plan) else None
            if runs is not None:
                # contiguous documents and masks of q - kv alone: each document is the plan on
                # its own tokens (what a varlen kernel runs), with no cross-document block at all
                parts = [
                    fn(
                        dataclasses.replace(plan, q_len=e - a, kv_len=e - a, mask_kind=None),
                        *(t[:, :, a:e] for t in one),
                        None,
                    )
                    for a, e in runs
                ]
                outs.append(tuple(torch.cat(x, dim=2) for x in zip(*parts)))
                continue
            docs = SameDocument(row)
            programs = tuple(M.conj(p, docs) for p in plan.programs)
            row_plan = dataclasses.replace(plan, programs=programs, mask_kind=None)
            outs.append(fn(row_plan, *one, None))
        return tuple(torch.cat(parts) for parts in zip(*outs))

    return run


def _runs_apply(plan: AttentionPlan) -> bool:
    """Documents can run one by one: self-attention from the first key, masks of q - kv alone
    (the same on every document's own positions), model order."""
    return (
        plan.q_offset == 0
        and plan.q_len == plan.kv_len
        and plan.permute is None
        and all(p.reads_distance_only for p in plan.programs)
    )


def _document_runs(ids_row: Tensor) -> list[tuple[int, int]] | None:
    """``(start, end)`` of each document when every document is one contiguous run, else None."""
    ids_row = ids_row.cpu()
    cut = (torch.nonzero(ids_row[1:] != ids_row[:-1]).flatten() + 1).tolist()
    bounds = [0, *cut, ids_row.numel()]
    if len(bounds) - 1 != torch.unique(ids_row).numel():
        return None  # an id in two runs: its parts see each other
    return list(zip(bounds[:-1], bounds[1:]))


EXECUTORS: dict[str, Executor] = {
    e.name: e
    for e in (
        _kernels("triton", "cuda", "cuda", "the generated Triton kernels, compiled for the GPU"),
        _kernels("interpret", "cpu", "interpret", "the generated Triton kernels under the Triton interpreter"),
        Executor(
            "torch",
            "cpu",
            None,
            _documents_per_row(
                _dense_score_mods(functools.partial(with_nonfinite_keys, attention_torch_forward), attention_reference)
            ),
            _documents_per_row(_dense_score_mods(attention_torch_backward, _reference_backward)),
            "the block-sparse CPU path over ATen's fused attention (dense for soft-capped or ALiBi scores)",
            _documents_per_row(_dense_score_mods(decode_torch_forward, attention_reference)),
        ),
        Executor("reference", None, None, attention_reference, _reference_backward, "the exact dense attention"),
    )
}
#: what ``auto`` means on each device type (anything else: ``reference``)
AUTO = {"cuda": "triton", "cpu": "torch"}
#: every name the ``executor`` option accepts
NAMES = ("auto", *EXECUTORS)


def resolve_executor(name: str, device: torch.device) -> Executor:
    """The executor ``name`` (``auto``: by device) for tensors on ``device``; ValueError for an
    unknown name or a device the executor does not run on."""
    if name == "auto":
        name = AUTO.get(device.type, "reference")
    executor = EXECUTORS.get(name)
    if executor is None:
        raise ValueError(f"unknown executor '{name}'; expected one of {', '.join(NAMES)}")
    executor.check_device(device)
    return executor


#: callables ``(plan, mask tensor or None, selection or None)`` told about every forward call
#: (:func:`observing`; explain measures densities on real inputs with it)
_observers: list[Callable[[AttentionPlan, Tensor | None, Tensor | None], None]] = []


@contextlib.contextmanager
def observing(fn: Callable[[AttentionPlan, Tensor | None, Tensor | None], None]):
    """Within the block, ``fn(plan, mask, selected)`` is called for every forward attention call:
    its plan, the model's mask tensor and, for data-dependent plans, the selected blocks."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


def _observe(plan: AttentionPlan, mask: Tensor | None, selected: Tensor | None) -> None:
    for fn in list(_observers):
        fn(plan, mask, selected)


def run(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, executor: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Forward attention per the plan: ``(out [B, H, Sq, Dv], lse [B, H, Sq] fp32)``. A plan with
    data-dependent selectors estimates and selects its blocks first."""
    ex = resolve_executor(executor, q.device)
    check_inputs(plan, q, k, v, mask)
    if plan.q_len == 0 or plan.kv_len == 0:
        return _no_pairs(plan, q)
    if plan.is_dynamic:
        selected = selectors.select_blocks(plan, q, k, ex.target)
        if _observers:
            _observe(plan, mask, selected)
        return selectors.attend(plan, q, k, v, mask, selected, ex.target)
    if _observers:
        _observe(plan, mask, None)
    if ex.decode is not None and decode_table.unsupported(plan) is None:
        return ex.decode(plan, q, k, v, mask)
    return ex.forward(plan, q, k, v, mask)


def _no_pairs(plan: AttentionPlan, q: Tensor) -> tuple[Tensor, Tensor]:
    """No queries or no keys: eager SDPA's shapes, every row empty (zeros, ``lse = -inf``)."""
    b = q.shape[0]
    out = q.new_zeros(b, plan.num_heads, plan.q_len, plan.head_dim_v)
    return out, torch.full((b, plan.num_heads, plan.q_len), float("-inf"), device=q.device)


def run_backward(
    plan: AttentionPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None = None,
    mask: Tensor | None = None,
    executor: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` in the dtypes of q, k, v, given the forward's ``out`` and ``lse``
    and the incoming ``dout`` (and ``dlse`` when the log-sum-exp is used downstream: the exact
    dense backward takes it; the block-sparse backwards do not, so a non-zero ``dlse`` runs
    the reference)."""
    ex = resolve_executor(executor, q.device)
    check_inputs(plan, q, k, v, mask)
    b, h = q.shape[0], plan.num_heads
    for what, t, shape in (
        ("out", out, (b, h, plan.q_len, plan.head_dim_v)),
        ("dout", dout, (b, h, plan.q_len, plan.head_dim_v)),
        ("lse", lse, (b, h, plan.q_len)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"attention backward: {what} has shape {list(t.shape)}, the plan expects {list(shape)}")
    if plan.q_len == 0 or plan.kv_len == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if plan.is_dynamic:
        raise ValueError(
            f"rule '{plan.rule}': attention with data-dependent block selection has no backward yet "
            "(train with a static mask, or run this model under torch.no_grad())"
        )
    if dlse is not None and bool((dlse != 0).any()):
        return attention_backward_reference(plan, q, k, v, dout, dlse, mask)
    return ex.backward(plan, q, k, v, out, lse, dout.contiguous(), mask)


def select(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, executor: str) -> Tensor:
    """The blocks a dynamic plan's selectors keep for these inputs, ``[B, H, nq, nk]`` bool."""
    ex = resolve_executor(executor, q.device)
    check_inputs(plan, q, k, v, mask)
    return selectors.select_blocks(plan, q, k, ex.target)


def attend(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, selected: Tensor, executor: str
) -> tuple[Tensor, Tensor]:
    """Attention of a dynamic plan under a selection made by :func:`select` (here or at another
    site or call)."""
    ex = resolve_executor(executor, q.device)
    check_inputs(plan, q, k, v, mask)
    if _observers:
        _observe(plan, mask, selected)
    return selectors.attend(plan, q, k, v, mask, selected, ex.target)


def fit_selection(plan: AttentionPlan, selected: Tensor | None, q: Tensor) -> Tensor | None:
    """A stored selection fitted to these inputs: as it is when its shape is the one they need;
    widened with unselected kv blocks when only the keys grew (a cache gained blocks since it was
    computed: those blocks were never candidates of that selection); None when it cannot be
    reused (another batch, head count, query-block count or device, or fewer keys)."""
    if selected is None or selected.device != q.device:
        return None
    want = selection_shape(plan, q.shape[0])
    have = tuple(selected.shape)
    if have == want:
        return selected
    if have[:3] != want[:3] or have[3] > want[3]:
        return None
    return torch.nn.functional.pad(selected, (0, want[3] - have[3]))


def run_permuted(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, executor: str, segment: int
) -> tuple[Tensor, Tensor]:
    """Forward of a plan whose keys are ordered by importance inside ``segment``-token runs at run time."""
    ex = resolve_executor(executor, q.device)
    check_inputs(plan, q, k, v, mask)
    return selectors.run_permuted(plan, q, k, v, mask, segment, ex.target)
