"""Launch a plan's generated backward kernels (dQ, dK/dV): ``triton`` on CUDA tensors, ``interpret``
on CPU; plus their signatures and constexprs for ahead-of-time compiles and the dump.

Every launch honours the plan's layout contract (model token order, GQA at kv-head shape, optional
run-time mask tensor, permutation, ``q_offset``) and gives rows with no allowed key
(``lse = -inf``) zero gradient. An additive mask tensor is a constant: it gets no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from attncc.codegen.aot import Job, recorded_jobs, write_family
from attncc.codegen.backward.generate import kernel_names
from attncc.codegen.cache import BACKWARD, KernelCache, default_cache
from attncc.codegen.common import example_inputs, mask_argument, next_pow2, shape_text
from attncc.codegen.configs import BackwardConfig, TileConfig, at_tiles, backward_config, cuda_arch
from attncc.codegen.documents import document_argument, document_table
from attncc.ir.blocks import BlockTable
from attncc.ir.dtypes import dtype_name
from attncc.ir.plan import AttentionPlan

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: query rows per program of the delta = rowsum(dout * out) preprocess kernel
PREPROCESS_ROWS = 64


# -- Triton: generated kernels (compiled on CUDA, interpreted on CPU) ---------------------------


@dataclass(frozen=True)
class _Tables:
    """Forward and transposed block tables of a plan, flat and on the kernels' device."""

    forward: BlockTable
    transposed: BlockTable
    head_to_program: torch.Tensor
    order: torch.Tensor


@functools.lru_cache(maxsize=64)
def _tables(plan: AttentionPlan, device: torch.device, dkdv: tuple[int, int], dq: tuple[int, int]) -> _Tables:
    """The dQ kernel's forward table at its tiles ``dq`` and the dK/dV kernel's transposed table
    at its tiles ``dkdv`` (each ``(block_m, block_n)``), on ``device``."""
    fwd = at_tiles(plan, *dq).block_table()
    tr = at_tiles(plan, *dkdv).block_table().transposed()
    order = plan.order()
    if order is None:
        order = torch.zeros(1, dtype=torch.int64)
    h2p = torch.tensor(plan.head_to_program, dtype=torch.int32)
    fwd, tr = (_contiguous(t).to(device) for t in (fwd, tr))
    return _Tables(fwd, tr, h2p.to(device), order.to(device))


def _role_tables(plan: AttentionPlan, device, config: BackwardConfig) -> _Tables:
    return _tables(plan, device, _tile(config.dkdv), _tile(config.dq))


def _tile(t: TileConfig) -> tuple[int, int]:
    return t.block_m, t.block_n


def _contiguous(t: BlockTable) -> BlockTable:
    return BlockTable(
        t.kv_num_blocks.contiguous(),
        t.kv_indices.contiguous(),
        t.full_num_blocks.contiguous(),
        t.full_indices.contiguous(),
        t.block_q,
        t.block_kv,
        t.num_kv_blocks,
    )


def backward_aot_jobs(
    plan: AttentionPlan, arch: int, out_dir: str | os.PathLike, config: BackwardConfig | None = None
) -> list[Job]:
    """``Job``s compiling the plan's three backward kernels for ``sm_<arch>`` as the JIT builds
    them for a call of the plan's shapes (batch 1, contiguous tensors) on ``config`` (default: the
    arch's)."""
    x = example_inputs(plan)

    def launch(cache: KernelCache) -> None:
        args = (x["q"], x["k"], x["v"], x["out"], x["lse"], x["dout"], x["mask"])
        attention_bwd(plan, *args, target="cuda", arch=arch, config=config, cache=cache)

    return recorded_jobs(launch, BACKWARD, plan, arch, out_dir, shape_text(plan))


def write_backward_kernels(
    folder: str | os.PathLike, plans: list[AttentionPlan], *, archs: tuple[int, ...] = (90,), aot: bool = True
) -> list[dict]:
    """Dump the plans' backward kernels (dQ, dK/dV) into ``folder`` (:func:`attncc.codegen.aot.write_family`)."""
    return write_family(folder, plans, BACKWARD, kernel_names, backward_aot_jobs, archs=archs, aot=aot)


def backward_constexprs(
    plan: AttentionPlan,
    config: BackwardConfig,
    tables: _Tables,
    dtype: str | None = None,
    mask_kind: str | None = None,
    *,
    interpret: bool = False,
    count_visits: bool = False,
) -> dict[str, dict]:
    """The ``tl.constexpr`` (and run-time length) arguments of each backward kernel
    (``preprocess``, ``dkdv``, ``dq``) on ``config``'s tiles and ``tables`` (built at them), for
    tensors of ``dtype`` (default: the plan's) and a mask tensor of ``mask_kind`` (default: the
    plan's)."""
    dtype = dtype or plan.dtype
    mask_kind = plan.mask_kind if mask_kind is None else mask_kind
    common = dict(
        H=plan.num_heads,
        H_KV=plan.num_kv_heads,
        GROUP=plan.gqa_group,
        Q_LEN=plan.q_len,
        KV_LEN=plan.kv_len,
        Q_OFFSET=plan.q_offset,
        HEAD_DIM=plan.head_dim,
        HEAD_DIM_V=plan.head_dim_v,
        BLOCK_D=next_pow2(plan.head_dim, 16),
        BLOCK_DV=next_pow2(plan.head_dim_v, 16),
        HAS_PERM=plan.permute is not None,
        HAS_MASK_TENSOR=mask_kind is not None,
        MASK_IS_BOOL=mask_kind == "bool",
        # the interpreter's tl.dot is wrong for low-precision inputs: upcast tiles there
        UPCAST=interpret and dtype != "float32",
        # fp32 keeps fp32 accuracy on GPUs (no TF32); fp16/bf16 use the tensor cores as they are
        INPUT_PRECISION="ieee" if dtype == "float32" else "tf32",
        COUNT_VISITS=count_visits,
    )

    def role(tiles: TileConfig, table: BlockTable, nq: int, nk: int) -> dict:
        return dict(
            common,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            NUM_Q_BLOCKS=nq,
            NUM_KV_BLOCKS=nk,
            EVEN_Q=plan.q_len % tiles.block_m == 0,
            EVEN_KV=plan.kv_len % tiles.block_n == 0,
            MAX_PARTIAL=table.kv_indices.shape[2],
            MAX_FULL=table.full_indices.shape[2],
        )

    fwd, tr = tables.forward, tables.transposed
    return {
        "preprocess": dict(
            H=plan.num_heads,
            Q_LEN=plan.q_len,
            HEAD_DIM_V=plan.head_dim_v,
            BLOCK_M=PREPROCESS_ROWS,
            BLOCK_DV=common["BLOCK_DV"],
        ),
        # the transposed table's rows are kv blocks: its "q" side is the kv side
        "dkdv": role(config.dkdv, tr, tr.num_kv_blocks, tr.num_q_blocks),
        "dq": role(config.dq, fwd, fwd.num_q_blocks, fwd.num_kv_blocks),
    }


def _table_args(t: BlockTable) -> tuple[torch.Tensor, ...]:
    return t.kv_num_blocks, t.kv_indices, t.full_num_blocks, t.full_indices


def _grad_buffers(q, k, v, grads: Grads | None) -> Grads:
    if grads is None:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for what, buf, ref in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        if buf.shape != ref.shape or buf.stride(-1) != 1:
            raise ValueError(f"grads: {what} must have shape {list(ref.shape)} and a contiguous last dim")
    return grads


def attention_bwd(
    plan: AttentionPlan,
    q,
    k,
    v,
    out,
    lse,
    dout,
    mask_tensor=None,
    *,
    target: str,
    grads: Grads | None = None,
    visits: dict | None = None,
    cache: KernelCache | None = None,
    config: BackwardConfig | None = None,
    arch: int | None = None,
) -> Grads:
    """Gradients ``(dq [B, H, Sq, D], dk [B, Hkv, Skv, D], dv [B, Hkv, Skv, Dv])`` from the
    generated kernels on ``target`` (``cuda`` or ``interpret``), in the dtypes of q, k, v.

    ``out``/``lse`` are the forward's outputs (``lse`` fp32 ``[B, H, Sq]``, natural log of the
    scaled scores' row sums). ``grads`` optionally supplies the three output buffers (the kernels
    write every element of them). ``config``: the kernels' tiles (default
    :func:`attncc.codegen.configs.backward_config` for ``arch``, default q's device; the
    interpreter keeps the plan's blocks). ``visits`` receives ``{"dkdv": [B, H, nq, nk], "dq":
    [B, H, nq, nk]}`` int32 counts of visited tile pairs, each at its kernel's tiles. Inputs are
    those the executor table checked."""
    module = (cache or default_cache()).module(plan, target, BACKWARD)
    names = kernel_names(plan)
    dev = q.device
    if config is None:
        if target == "cuda" and arch is None and dev.type == "cuda":
            arch = cuda_arch(dev)
        config = backward_config(plan, arch if target == "cuda" else None, dtype_name(q.dtype))
    tables = _role_tables(plan, dev, config)
    bsz, h, hkv = q.shape[0], plan.num_heads, plan.num_kv_heads
    if plan.mask_kind == "documents":
        assert mask_tensor is not None
        if bsz > 1:
            return _documents_bwd(plan, q, k, v, out, lse, dout, mask_tensor, target, grads, visits, cache, config)
        # the tables of this batch element's documents, filtered on the device
        row, length = mask_tensor[0], (plan.q_len, plan.q_offset, plan.kv_len)
        tables = dataclasses.replace(
            tables,
            forward=document_table(tables.forward, row, *length),
            transposed=document_table(tables.transposed, row, *length, transposed=True),
        )
    q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.to(torch.float32).contiguous()
    dq, dk, dv = _grad_buffers(q, k, v, grads)
    shape = (bsz, plan.num_heads, plan.q_len, plan.kv_len)
    if plan.mask_kind == "documents":
        mt, mask_strides = document_argument(mask_tensor)
    else:
        mt, mask_strides = mask_argument(mask_tensor, shape, tables.order, torch.uint8)
    fwd, tr = tables.forward, tables.transposed
    count = visits is not None
    interpret = target == "interpret"
    consts = backward_constexprs(plan, config, tables, dtype_name(q.dtype), interpret=interpret, count_visits=count)
    n_visits = {r: bsz * h * consts[r]["NUM_Q_BLOCKS"] * consts[r]["NUM_KV_BLOCKS"] for r in ("dkdv", "dq")}
    visit_dkdv = torch.zeros(n_visits["dkdv"] if count else 1, dtype=torch.int32, device=dev)
    visit_dq = torch.zeros(n_visits["dq"] if count else 1, dtype=torch.int32, device=dev)

    delta = torch.empty(bsz, h, plan.q_len, dtype=torch.float32, device=dev)
    preprocess, dkdv, dq_kernel = (getattr(module, names[n]) for n in ("preprocess", "dkdv", "dq"))
    pre_args = (out, dout, delta, *out.stride()[:3], *dout.stride()[:3])
    pre_grid = (-(-plan.q_len // PREPROCESS_ROWS), bsz * h)
    preprocess[pre_grid](*pre_args, **consts["preprocess"], num_warps=4, num_stages=1)
    inputs = (q, k, v, dout, lse, delta)
    shared = (mt, tables.order, tables.order, tables.head_to_program)
    in_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    # dK/dV: one program per (kv tile, batch x kv head), walking the transposed table
    args = (*inputs, dk, dv, *shared, *_table_args(tr), visit_dkdv, *in_strides, *dk.stride()[:3], *dv.stride()[:3])
    grid = (tr.num_q_blocks, bsz * hkv)
    dkdv[grid](*args, *mask_strides, plan.scale, **consts["dkdv"], **config.dkdv.launch())
    # dQ: one program per (query tile, batch x head), walking the forward table
    args = (*inputs, dq, *shared, *_table_args(fwd), visit_dq, *in_strides, *dq.stride()[:3])
    dq_kernel[(fwd.num_q_blocks, bsz * h)](*args, *mask_strides, plan.scale, **consts["dq"], **config.dq.launch())
    if visits is not None:
        for role, buf in (("dkdv", visit_dkdv), ("dq", visit_dq)):
            visits[role] = buf.view(bsz, h, consts[role]["NUM_Q_BLOCKS"], consts[role]["NUM_KV_BLOCKS"])
    return dq, dk, dv


def _documents_bwd(plan, q, k, v, out, lse, dout, ids, target, grads, visits, cache, config) -> Grads:
    """Packed documents: each batch element with its own tables (their documents differ)."""
    dq, dk, dv = _grad_buffers(q, k, v, grads)
    per: dict[str, list[torch.Tensor]] = {"dkdv": [], "dq": []}
    for i in range(q.shape[0]):
        one = slice(i, i + 1)
        seen: dict | None = {} if visits is not None else None
        attention_bwd(
            plan,
            q[one],
            k[one],
            v[one],
            out[one],
            lse[one],
            dout[one],
            ids[i : i + 1] if ids.shape[0] > 1 else ids,
            target=target,
            grads=(dq[one], dk[one], dv[one]),
            visits=seen,
            cache=cache,
            config=config,
        )
        if seen is not None:
            for role in per:
                per[role].append(seen[role])
    if visits is not None:
        visits.update({role: torch.cat(v_) for role, v_ in per.items()})
    return dq, dk, dv


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
