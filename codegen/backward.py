"""Attention backward per plan: dQ, dK, dV from (q, k, v, out, lse, dout) on every executor.

``attention_backward`` is the one entry point the custom op's autograd rule calls. Every
executor honours the plan's layout contract (model token order, GQA at kv-head shape, optional
runtime mask tensor, permutation, ``q_offset``) and gives rows with no allowed key (``lse = -inf``)
zero gradient. An additive mask tensor is treated as a constant: it gets no gradient.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from types import ModuleType

import torch
from attncc.codegen.backward_gen import backward_source, kernel_names

from attncc import masks as M
from attncc.blocks import BlockTable
from attncc.plan import AttentionPlan

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def attention_backward(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    mask_tensor: torch.Tensor | None = None,
    executor: str = "auto",
    *,
    grads: Grads | None = None,
    visits: dict | None = None,
) -> Grads:
    """Gradients ``(dq [B, H, Sq, D], dk [B, Hkv, Skv, D], dv [B, Hkv, Skv, Dv])`` of attention
    per ``plan``, in the dtypes of q, k, v.

    ``out``/``lse`` are the forward's outputs (``lse`` fp32 ``[B, H, Sq]``, natural log of the
    scaled scores' row sums). ``grads`` optionally supplies the three output buffers (the kernel
    executors write every element of them). ``visits`` (kernel executors only) receives
    ``{"dkdv": [B, H, nq, nk], "dq": [B, H, nq, nk]}`` int32 counts of visited block pairs.
    """
    from attncc.codegen.executors import resolve_executor

    name = resolve_executor(executor, q.device)
    _check_shapes(plan, q, k, v, out, lse, dout)
    if name == "reference":
        result = _backward_reference(plan, q, k, v, dout, mask_tensor)
    elif name == "torch":
        torch_backward = _torch_exec_backward()
        if torch_backward is not None:
            result = torch_backward(plan, q, k, v, out, lse, dout, mask_tensor)
        else:
            result = backward_torch(plan, q, k, v, out, lse, dout, mask_tensor)
    else:
        return _backward_triton(
            plan, q, k, v, out, lse, dout, mask_tensor, interpret=name == "interpret", grads=grads, visits=visits
        )
    if grads is None:
        return result
    for buf, g in zip(grads, result):
        buf.copy_(g)
    return grads


def _check_shapes(plan, q, k, v, out, lse, dout) -> None:
    b = q.shape[0]
    want = {
        "q": (q, (b, plan.num_heads, plan.q_len, plan.head_dim)),
        "k": (k, (b, plan.num_kv_heads, plan.kv_len, plan.head_dim)),
        "v": (v, (b, plan.num_kv_heads, plan.kv_len, plan.head_dim_v)),
        "out": (out, (b, plan.num_heads, plan.q_len, plan.head_dim_v)),
        "dout": (dout, (b, plan.num_heads, plan.q_len, plan.head_dim_v)),
        "lse": (lse, (b, plan.num_heads, plan.q_len)),
    }
    for what, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"attention_backward: {what} has shape {list(t.shape)}, the plan expects {list(shape)}")


# -- reference: autograd through the dense oracle -----------------------------------------------


def _backward_reference(plan, q, k, v, dout, mask_tensor) -> Grads:
    """Exact gradients: autograd through ``attention_reference`` in fp32 (fp64 for fp64 inputs)."""
    from attncc.codegen.reference import attention_reference

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        qa, ka, va = (t.detach().to(acc).requires_grad_(True) for t in (q, k, v))
        mt = None if mask_tensor is None else mask_tensor.detach()
        out, _ = attention_reference(plan, qa, ka, va, mt)
        dq, dk, dv = torch.autograd.grad(out, (qa, ka, va), dout.to(acc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -- torch: block-sparse CPU path --------------------------------------------------------------


def _torch_exec_backward():
    """The CPU executor's own backward (``attention_torch_backward``) when it provides one."""
    try:
        from attncc.codegen import torch_exec
    except ImportError:
        return None
    return getattr(torch_exec, "attention_torch_backward", None)


#: bound on the elements of one gathered score tile [B, H_prog, rows, visited kv] in the torch path
_TORCH_TILE_ELEMS = 1 << 24


def backward_torch(plan: AttentionPlan, q, k, v, out, lse, dout, mask_tensor=None) -> Grads:
    """Block-sparse backward in torch: per mask program and group of query blocks, gather only
    the kv blocks the block table lists, recompute P from ``lse`` and scatter dK/dV back."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    bsz, h, g = q.shape[0], plan.num_heads, plan.gqa_group
    bq, bk = plan.block_q, plan.block_kv
    table = plan.block_table(dev)
    order = plan.order(dev)
    nq, nk = table.num_q_blocks, table.num_kv_blocks
    q_slot = _slots(plan.q_len, bq, nq, order, dev)  # [nq, bq] model row or -1
    kv_slot = _slots(plan.kv_len, bk, nk, order, dev)  # [nk, bk]

    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    doa = dout.to(acc)
    delta = (doa * out.to(acc)).sum(-1)  # [B, H, Sq]
    lse_a = lse.to(acc)
    lse_a = torch.where(torch.isneginf(lse_a), torch.full_like(lse_a, float("inf")), lse_a)
    mt = None if mask_tensor is None else mask_tensor.expand(bsz, h, plan.q_len, plan.kv_len)

    dq = torch.zeros_like(qa)
    # dK/dV per query head first; GQA sums them per kv head at the end
    dk_h = torch.zeros(bsz, h, plan.kv_len, plan.head_dim, dtype=acc, device=dev)
    dv_h = torch.zeros(bsz, h, plan.kv_len, plan.head_dim_v, dtype=acc, device=dev)
    for prog_i, prog in enumerate(plan.programs):
        heads = torch.tensor([i for i, j in enumerate(plan.head_to_program) if j == prog_i], device=dev)
        kv_heads = heads // g
        counts = (table.kv_num_blocks[prog_i] + table.full_num_blocks[prog_i]).long()  # [nq]
        blocks = torch.cat([table.kv_indices[prog_i], table.full_indices[prog_i]], 1).long()  # [nq, w]
        width = blocks.shape[1]
        listed = torch.cat(
            [
                _listed(table.kv_num_blocks[prog_i], table.kv_indices.shape[2]),
                _listed(table.full_num_blocks[prog_i], table.full_indices.shape[2]),
            ],
            1,
        )  # [nq, w]
        need_mask = torch.cat(
            [
                torch.ones_like(table.kv_indices[prog_i], dtype=torch.bool),
                torch.zeros_like(table.full_indices[prog_i], dtype=torch.bool),
            ],
            1,
        )
        # keep only query blocks that visit something, sorted so the listed blocks come first
        rows = (counts > 0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        max_w = int(counts.max())
        key = torch.where(listed, torch.arange(width, device=dev).view(1, -1), width + 1)
        first = key.argsort(1)[:, :max_w]
        blocks = blocks.gather(1, first)
        listed = listed.gather(1, first)
        need_mask = need_mask.gather(1, first)
        step = max(1, _TORCH_TILE_ELEMS // max(1, bsz * heads.numel() * bq * max_w * bk))
        for r0 in range(0, rows.numel(), step):
            qb = rows[r0 : r0 + step]  # [R] query blocks
            _backward_torch_blocks(
                plan,
                prog,
                qb,
                blocks[qb],
                listed[qb],
                need_mask[qb],
                q_slot,
                kv_slot,
                heads,
                kv_heads,
                qa,
                ka,
                va,
                doa,
                lse_a,
                delta,
                mt,
                dq,
                dk_h,
                dv_h,
            )
    dk = dk_h.view(bsz, plan.num_kv_heads, g, plan.kv_len, plan.head_dim).sum(2)
    dv = dv_h.view(bsz, plan.num_kv_heads, g, plan.kv_len, plan.head_dim_v).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _listed(counts: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, width] bool: which entries of a padded per-row index list are real."""
    return torch.arange(width, device=counts.device).view(1, -1) < counts.view(-1, 1)


def _slots(length: int, block: int, nblocks: int, order, dev) -> torch.Tensor:
    pos = torch.full((nblocks * block,), -1, dtype=torch.long, device=dev)
    pos[:length] = torch.arange(length, device=dev) if order is None else order
    return pos.view(nblocks, block)


def _backward_torch_blocks(
    plan,
    prog,
    qb,
    blocks,
    listed,
    need_mask,
    q_slot,
    kv_slot,
    heads,
    kv_heads,
    q,
    k,
    v,
    do,
    lse,
    delta,
    mt,
    dq,
    dk_h,
    dv_h,
) -> None:
    """One batch of query blocks ``qb`` [R] of one mask program against their listed kv blocks
    ``blocks`` [R, W] (``listed`` marks real entries, ``need_mask`` the partial ones)."""
    r, w = blocks.shape
    bk = kv_slot.shape[1]
    q_rows = q_slot[qb]  # [R, bq] model rows, -1 past the end
    kv_rows = kv_slot[blocks].view(r, w * bk)  # [R, W*bk]
    kv_ok = (kv_rows >= 0) & listed.repeat_interleave(bk, 1)  # [R, W*bk]
    q_ok = q_rows >= 0
    qr, kr = q_rows.clamp(min=0), kv_rows.clamp(min=0)
    # structural mask: evaluated only on partial blocks, full blocks pass
    allowed = q_ok[:, :, None] & kv_ok[:, None, :]  # [R, bq, W*bk]
    partial = need_mask.repeat_interleave(bk, 1)[:, None, :]
    if bool(partial.any()):
        hs = heads[:1].view(1, 1, 1)  # every head of a program shares its predicate
        if prog.depends_on_head:
            pred = torch.stack(
                [
                    prog.dense(
                        hh.view(1, 1, 1), qr[:, :, None] + plan.q_offset, kr[:, None, :], plan.q_len, plan.kv_len
                    )
                    for hh in heads
                ],
                0,
            )  # [Hp, R, bq, W*bk]
        else:
            pred = prog.dense(hs, qr[:, :, None] + plan.q_offset, kr[:, None, :], plan.q_len, plan.kv_len)[None]
        allowed = allowed[None] & (pred | ~partial[None])  # [Hp|1, R, bq, W*bk]
    else:
        allowed = allowed[None]
    # gather [B, Hp, R, rows, D]
    qg = q[:, heads][:, :, qr]  # [B, Hp, R, bq, D]
    dog = do[:, heads][:, :, qr]
    lseg = lse[:, heads][:, :, qr]  # [B, Hp, R, bq]
    dlt = delta[:, heads][:, :, qr]
    kg = k[:, kv_heads][:, :, kr]  # [B, Hp, R, W*bk, D]
    vg = v[:, kv_heads][:, :, kr]
    s = torch.matmul(qg, kg.transpose(-1, -2)) * plan.scale  # [B, Hp, R, bq, W*bk]
    allowed = allowed.unsqueeze(0)
    if mt is not None:
        mg = mt[:, heads][:, :, qr[:, :, None], kr[:, None, :]]  # [B, Hp, R, bq, W*bk]
        if mg.dtype == torch.bool:
            allowed = allowed & mg
        else:
            s = s + mg.to(s.dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - lseg.unsqueeze(-1))  # [B, Hp, R, bq, W*bk]
    dvg = torch.matmul(p.transpose(-1, -2), dog)  # [B, Hp, R, W*bk, Dv]
    dp = torch.matmul(dog, vg.transpose(-1, -2))
    ds = p * (dp - dlt.unsqueeze(-1))
    dqg = torch.matmul(ds, kg) * plan.scale  # [B, Hp, R, bq, D]
    dkg = torch.matmul(ds.transpose(-1, -2), qg) * plan.scale  # [B, Hp, R, W*bk, D]
    # scatter back (padding rows/cols carry exact zeros, so index 0 receives nothing wrong)
    q_idx = qr.flatten()
    dq_h = dq[:, heads]
    dq_h.index_add_(2, q_idx, (dqg * q_ok[None, None, :, :, None]).flatten(2, 3))
    dq[:, heads] = dq_h
    kv_idx = kr.flatten()
    kv_keep = kv_ok[None, None, :, :, None]
    dk_sel = dk_h[:, heads]
    dk_sel.index_add_(2, kv_idx, (dkg * kv_keep).flatten(2, 3))
    dk_h[:, heads] = dk_sel
    dv_sel = dv_h[:, heads]
    dv_sel.index_add_(2, kv_idx, (dvg * kv_keep).flatten(2, 3))
    dv_h[:, heads] = dv_sel


# -- Triton: generated kernels (compiled on CUDA, interpreted on CPU) ---------------------------


@dataclass(frozen=True)
class _Tables:
    """Forward and transposed block tables of a plan, flat and on the kernels' device."""

    forward: BlockTable
    transposed: BlockTable
    head_to_program: torch.Tensor
    order: torch.Tensor


@functools.lru_cache(maxsize=64)
def _tables(plan: AttentionPlan, device: torch.device) -> _Tables:
    fwd = plan.block_table()
    tr = fwd.transposed()
    order = plan.order()
    if order is None:
        order = torch.zeros(1, dtype=torch.int64)
    h2p = torch.tensor(plan.head_to_program, dtype=torch.int32)
    fwd, tr = (_contiguous(t).to(device) for t in (fwd, tr))
    return _Tables(fwd, tr, h2p.to(device), order.to(device))


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


_KERNEL_DIR = os.path.join(tempfile.gettempdir(), "attncc_kernels")


def triton_mode() -> str:
    """``"interpret"`` or ``"compile"``: how ``triton.jit`` builds kernels in this process. Triton
    fixes this when it is first imported (``TRITON_INTERPRET=1``), so an interpreter run is
    possible only if that variable was set before; when triton is not imported yet it is set here."""
    if "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl

    return "interpret" if type(tl.sum).__name__ == "InterpretedFunction" else "compile"


@functools.lru_cache(maxsize=128)
def load_backward_module(plan: AttentionPlan) -> ModuleType:
    """Import the plan's generated backward module, cached by source hash (the file stays on
    disk because ``triton.jit`` reads kernel source from it)."""
    source = backward_source(plan)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    os.makedirs(_KERNEL_DIR, exist_ok=True)
    path = os.path.join(_KERNEL_DIR, f"{plan.pattern}_bwd_{digest}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    mod_name = f"attncc_generated.{plan.pattern}_bwd_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def _next_pow2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _backward_triton(
    plan: AttentionPlan,
    q,
    k,
    v,
    out,
    lse,
    dout,
    mask_tensor,
    *,
    interpret: bool,
    grads: Grads | None,
    visits: dict | None,
) -> Grads:
    for prog in plan.programs:
        if prog.is_dynamic:
            raise M.MaskError(
                f"mask {prog} selects blocks at run time; executor "
                f"'{'interpret' if interpret else 'triton'}' needs a static block table "
                "(use executor='reference')"
            )
    mode = triton_mode()
    if interpret and mode != "interpret":
        raise RuntimeError(
            "executor 'interpret' needs TRITON_INTERPRET=1 in the environment before triton is "
            "first imported; this process imported triton in compile mode"
        )
    if not interpret and mode != "compile":
        raise RuntimeError(
            "executor 'triton' cannot run: TRITON_INTERPRET=1 put triton in interpreter mode "
            "(use executor='interpret' on CPU tensors)"
        )
    if interpret and q.device.type != "cpu":
        raise ValueError(
            f"executor 'interpret' runs the Triton interpreter on CPU tensors; got {q.device} (use executor='triton')"
        )
    if not interpret and q.device.type != "cuda":
        raise ValueError(f"executor 'triton' needs CUDA tensors; got {q.device} (use 'interpret' or 'torch' on CPU)")
    if plan.block_q < 16 or plan.block_kv < 16:
        raise ValueError(f"block sizes {plan.block_q}x{plan.block_kv}: the kernels need blocks of at least 16")
    if q.dtype == torch.float64:
        raise ValueError("the Triton backward kernels take fp32/fp16/bf16; use executor='reference' for fp64")
    module = load_backward_module(plan)
    names = kernel_names(plan)
    dev = q.device
    tables = _tables(plan, dev)
    bsz, h, hkv = q.shape[0], plan.num_heads, plan.num_kv_heads
    q, k, v, out, dout = (_last_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.to(torch.float32).contiguous()

    if grads is None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    else:
        dq, dk, dv = grads
        for what, buf, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            if buf.shape != ref.shape or buf.stride(-1) != 1:
                raise ValueError(f"grads: {what} must have shape {list(ref.shape)} and a contiguous last dim")

    if mask_tensor is not None:
        mt = mask_tensor.expand(bsz, h, plan.q_len, plan.kv_len)
        if mt.dtype == torch.bool:
            mt = mt.view(torch.uint8)
        mask_strides = mt.stride()
    else:
        mt, mask_strides = tables.order, (0, 0, 0, 0)

    # interpreter tl.dot is wrong for low-precision inputs: upcast tiles there
    upcast = interpret and q.dtype != torch.float32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    fwd, tr = tables.forward, tables.transposed
    nq, nk = fwd.num_q_blocks, fwd.num_kv_blocks
    count = visits is not None
    visit_dkdv = torch.zeros(bsz * h * nq * nk if count else 1, dtype=torch.int32, device=dev)
    visit_dq = torch.zeros_like(visit_dkdv)
    flags = dict(
        H=h,
        H_KV=hkv,
        GROUP=plan.gqa_group,
        Q_LEN=plan.q_len,
        KV_LEN=plan.kv_len,
        Q_OFFSET=plan.q_offset,
        NUM_Q_BLOCKS=nq,
        NUM_KV_BLOCKS=nk,
        HEAD_DIM=plan.head_dim,
        HEAD_DIM_V=plan.head_dim_v,
        BLOCK_D=_next_pow2(plan.head_dim),
        BLOCK_DV=_next_pow2(plan.head_dim_v),
        BLOCK_M=plan.block_q,
        BLOCK_N=plan.block_kv,
        HAS_PERM=plan.permute is not None,
        HAS_MASK_TENSOR=mask_tensor is not None,
        MASK_IS_BOOL=mask_tensor is not None and mask_tensor.dtype == torch.bool,
        EVEN_Q=plan.q_len % plan.block_q == 0,
        EVEN_KV=plan.kv_len % plan.block_kv == 0,
        UPCAST=upcast,
        INPUT_PRECISION=precision,
        COUNT_VISITS=count,
    )

    delta = torch.empty(bsz, h, plan.q_len, dtype=torch.float32, device=dev)
    getattr(module, names["preprocess"])[(nq, bsz * h)](
        out,
        dout,
        delta,
        *out.stride()[:3],
        *dout.stride()[:3],
        H=h,
        Q_LEN=plan.q_len,
        HEAD_DIM_V=plan.head_dim_v,
        BLOCK_M=plan.block_q,
        BLOCK_DV=flags["BLOCK_DV"],
    )
    getattr(module, names["dkdv"])[(nk, bsz * hkv)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        mt,
        tables.order,
        tables.order,
        tables.head_to_program,
        tr.kv_num_blocks,
        tr.kv_indices,
        tr.full_num_blocks,
        tr.full_indices,
        visit_dkdv,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *dout.stride()[:3],
        *dk.stride()[:3],
        *dv.stride()[:3],
        *mask_strides,
        plan.scale,
        MAX_PARTIAL=tr.kv_indices.shape[2],
        MAX_FULL=tr.full_indices.shape[2],
        **flags,
    )
    getattr(module, names["dq"])[(nq, bsz * h)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        mt,
        tables.order,
        tables.order,
        tables.head_to_program,
        fwd.kv_num_blocks,
        fwd.kv_indices,
        fwd.full_num_blocks,
        fwd.full_indices,
        visit_dq,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *dout.stride()[:3],
        *dq.stride()[:3],
        *mask_strides,
        plan.scale,
        MAX_PARTIAL=fwd.kv_indices.shape[2],
        MAX_FULL=fwd.full_indices.shape[2],
        **flags,
    )
    if count:
        visits["dkdv"] = visit_dkdv.view(bsz, h, nq, nk)
        visits["dq"] = visit_dq.view(bsz, h, nq, nk)
    return dq, dk, dv


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class AttentionFunction(torch.autograd.Function):
    """Differentiable ``executors.run`` for code that calls a plan directly (benchmarks, tests);
    compiled models go through the ``attncc::attention`` custom op instead."""

    @staticmethod
    def forward(ctx, q, k, v, mask_tensor, plan, executor):
        from attncc.codegen.executors import run

        out, lse = run(plan, q, k, v, mask_tensor, executor)
        ctx.save_for_backward(q, k, v, out, lse, mask_tensor)
        ctx.plan, ctx.executor = plan, executor
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask_tensor = ctx.saved_tensors
        dq, dk, dv = attention_backward(ctx.plan, q, k, v, out, lse, dout.contiguous(), mask_tensor, ctx.executor)
        return dq, dk, dv, None, None, None


def attention(plan: AttentionPlan, q, k, v, mask_tensor=None, executor: str = "auto") -> torch.Tensor:
    """``out`` of attention per ``plan``, differentiable in q, k, v through ``attention_backward``."""
    return AttentionFunction.apply(q, k, v, mask_tensor, plan, executor)
