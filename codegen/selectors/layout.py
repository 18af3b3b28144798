"""Static data of a plan whose mask programs contain a data-dependent selector: each program
split at its selector, label maps of both halves, the selector's candidate blocks, and the two
static plans whose forward kernels run the selected and the other blocks.

A selector node ``{topk: ...}`` / ``{threshold: ...}`` is a predicate constant on each (selector
query block, selector kv block) pair (see :mod:`attncc.ir.selection`): the program equals
``when_selected`` on selected block pairs and ``when_not`` elsewhere, both static masks."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from attncc.ir import masks as M
from attncc.ir.blocks import EMPTY, classify
from attncc.ir.plan import AttentionPlan
from attncc.ir.selection import SelectorConfig, SelectorProgram, resolve_selector, split_program

Tensor = torch.Tensor


@dataclass(frozen=True)
class DynamicLayout:
    """What a dynamic plan needs besides the data: per program its split, its selector config
    and static label maps (kernel blocks, ``[P, nq, nk]`` int8), and per selector program its
    candidates (selector blocks, ``[nI, nJ]`` bool)."""

    plan: AttentionPlan
    splits: tuple[SelectorProgram, ...]
    configs: tuple[SelectorConfig | None, ...]
    labels_sel: Tensor
    labels_not: Tensor
    candidates: tuple[Tensor | None, ...]
    plan_sel: AttentionPlan
    plan_not: AttentionPlan

    @property
    def num_q_blocks(self) -> int:
        return self.labels_sel.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.labels_sel.shape[2]

    def heads_of(self, program: int) -> list[int]:
        return [h for h, p in enumerate(self.plan.head_to_program) if p == program]


def _xor(a: M.Mask, b: M.Mask) -> M.Mask:
    return M.Any_((M.All((a, M.Not(b))), M.All((b, M.Not(a)))))


def _per_head_plan(plan: AttentionPlan, programs: list[M.Mask]) -> AttentionPlan:
    """A static plan with one program per head (its own block-table row per head)."""
    per_head = tuple(programs[p] for p in plan.head_to_program)
    return dataclasses.replace(plan, programs=per_head, head_to_program=tuple(range(plan.num_heads)))


@functools.lru_cache(maxsize=64)
def layout(plan: AttentionPlan) -> DynamicLayout:
    """Static data of a dynamic plan, built once per plan."""
    if plan.permute is not None:
        raise ValueError("selectors run in model order; a plan with a permutation cannot carry one")
    heads = plan.program_heads()
    splits: list[SelectorProgram] = []
    configs: list[SelectorConfig | None] = []
    lab_sel: list[Tensor] = []
    lab_not: list[Tensor] = []
    cands: list[Tensor | None] = []
    for prog, head in zip(plan.programs, heads):
        split = split_program(prog)
        splits.append(split)
        args = (plan.q_len, plan.kv_len, plan.block_q, plan.block_kv, head)
        lab_sel.append(classify(split.when_selected, *args, q_offset=plan.q_offset))
        lab_not.append(classify(split.when_not, *args, q_offset=plan.q_offset))
        if split.selector is None:
            configs.append(None)
            cands.append(None)
            continue
        cfg = resolve_selector(split.selector, plan.block_q, plan.block_kv)
        configs.append(cfg)
        diff = _xor(split.when_selected, split.when_not)
        cand = classify(diff, plan.q_len, plan.kv_len, cfg.block, cfg.block, head, q_offset=plan.q_offset)
        cands.append(cand != EMPTY)
    return DynamicLayout(
        plan,
        tuple(splits),
        tuple(configs),
        torch.stack(lab_sel),
        torch.stack(lab_not),
        tuple(cands),
        _per_head_plan(plan, [s.when_selected for s in splits]),
        _per_head_plan(plan, [s.when_not for s in splits]),
    )


def split_masks(plan: AttentionPlan, dev) -> tuple[Tensor, Tensor]:
    """``[H, Sq, Skv]`` bool masks (model order) of ``when_selected`` and ``when_not`` per head."""
    lay = layout(plan)
    m_sel = torch.empty(plan.num_heads, plan.q_len, plan.kv_len, dtype=torch.bool, device=dev)
    m_not = torch.empty_like(m_sel)
    for p, split in enumerate(lay.splits):
        heads = lay.heads_of(p)
        args = (plan.q_len, plan.kv_len)
        m_sel[heads] = M.dense(split.when_selected, *args, heads=heads, q_offset=plan.q_offset, device=dev)
        m_not[heads] = M.dense(split.when_not, *args, heads=heads, q_offset=plan.q_offset, device=dev)
    return m_sel, m_not


def dense_selected_mask(plan: AttentionPlan, selected: Tensor) -> Tensor:
    """``[B, H, Sq, Skv]`` bool: the plan's mask under the selection ``selected [B, H, nq, nk]``
    (kernel blocks): ``when_selected`` on selected block pairs, ``when_not`` elsewhere."""
    dev = selected.device
    m_sel, m_not = split_masks(plan, dev)
    rows = torch.arange(plan.q_len, device=dev) // plan.block_q
    cols = torch.arange(plan.kv_len, device=dev) // plan.block_kv
    tok = selected.index_select(-2, rows).index_select(-1, cols)
    return torch.where(tok, m_sel.unsqueeze(0), m_not.unsqueeze(0))


def selection_shape(plan: AttentionPlan, batch: int) -> tuple[int, int, int, int]:
    """Shape of a selection of ``plan``: ``[B, H, nq, nk]`` kernel blocks."""
    return (batch, plan.num_heads, -(-plan.q_len // plan.block_q), -(-plan.kv_len // plan.block_kv))


def _segment_labels(labels: Tensor, per: int) -> Tensor:
    """Block labels ``[P, nq, nk]`` (model order) -> labels valid for any key order that permutes
    keys only inside runs of ``per`` kv blocks: full where the whole run is full, empty where it
    is all empty, partial (predicate evaluated at model positions) otherwise."""
    p, nq, nk = labels.shape
    width = -(-nk // per) * per
    as_full = labels.new_full((p, nq, width), 2)
    as_empty = labels.new_zeros((p, nq, width))
    as_full[..., :nk] = labels
    as_empty[..., :nk] = labels
    all_full = (as_full.view(p, nq, -1, per) == 2).all(-1)
    all_empty = (as_empty.view(p, nq, -1, per) == 0).all(-1)
    runs = torch.where(all_full, 2, torch.where(all_empty, 0, 1)).to(labels.dtype)
    return runs.repeat_interleave(per, -1)[..., :nk].contiguous()


@functools.lru_cache(maxsize=64)
def permuted_layout(plan: AttentionPlan, segment: int) -> DynamicLayout:
    """:func:`layout` for keys in a run-time order sorted inside ``segment``-token runs: labels
    over slot blocks (each slot block holds keys of one segment) and forward plans that take
    the order as a kernel argument."""
    lay = layout(plan)
    if segment % plan.block_kv:
        raise ValueError(f"segment {segment} must be a multiple of the kernel kv block {plan.block_kv}")
    per = segment // plan.block_kv
    return dataclasses.replace(
        lay,
        labels_sel=_segment_labels(lay.labels_sel, per),
        labels_not=_segment_labels(lay.labels_not, per),
        plan_sel=dataclasses.replace(lay.plan_sel, runtime_key_order=True),
        plan_not=dataclasses.replace(lay.plan_not, runtime_key_order=True),
    )


def to_kernel_blocks(sel: Tensor, cfg: SelectorConfig, plan: AttentionPlan, nq: int, nk: int) -> Tensor:
    """Selector-block selection ``[.., nI, nJ]`` -> kernel-block selection ``[.., nq, nk]``."""
    rows = torch.arange(nq, device=sel.device) * plan.block_q // cfg.block
    cols = torch.arange(nk, device=sel.device) * plan.block_kv // cfg.block
    return sel.index_select(-2, rows).index_select(-1, cols)
