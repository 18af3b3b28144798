"""Attention backward per plan: dQ, dK, dV from (q, k, v, out, lse, dout) on every executor.

``attention_backward`` is the one entry point the custom op's autograd rule calls. Every
executor honours the plan's layout contract (model token order, GQA at kv-head shape, optional
runtime mask tensor, permutation, ``q_offset``) and gives rows with no allowed key (``lse = -inf``)
zero gradient. An additive mask tensor is treated as a constant: it gets no gradient.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
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
        # the CPU executor lowers its own block tables onto fused torch attention both ways
        from attncc.codegen.torch_exec import attention_torch_backward

        result = attention_torch_backward(plan, q, k, v, out, lse, dout, mask_tensor)
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


# -- reference: the dense oracle's exact gradient ---------------------------------------------


def _backward_reference(plan, q, k, v, dout, mask_tensor) -> Grads:
    """Exact gradients of ``attention_reference`` in fp32 (fp64 for fp64 inputs), in closed form:
    the custom op's backward runs below the autograd dispatch key, where autograd cannot
    record, so the derivative is written out (checked against finite differences by gradcheck)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = plan.gqa_group
    qf, kf, vf, do = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * plan.scale  # [B, H, Sq, Skv]
    allowed = plan.dense_mask(q.device).unsqueeze(0)
    if mask_tensor is not None:
        # an additive mask is a constant of the computation: it gets no gradient
        if mask_tensor.dtype == torch.bool:
            allowed = allowed & mask_tensor
        else:
            scores = scores + mask_tensor.detach().to(acc)
            allowed = allowed & (mask_tensor > float("-inf"))
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True).clamp(min=torch.finfo(acc).min)
    p = torch.exp(scores - lse).masked_fill(~allowed, 0.0)  # [B, H, Sq, Skv]; empty rows are 0
    out = torch.matmul(p, vf)
    delta = (do * out).sum(-1, keepdim=True)  # [B, H, Sq, 1]
    ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * plan.scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * plan.scale  # [B, H, Skv, D] per query head
    dv = torch.matmul(p.transpose(-1, -2), do)
    # GQA: the query heads sharing a kv head add their contributions
    b, hkv = k.shape[0], plan.num_kv_heads
    dk = dk.view(b, hkv, group, plan.kv_len, plan.head_dim).sum(2)
    dv = dv.view(b, hkv, group, plan.kv_len, plan.head_dim_v).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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


def backward_source_path(plan: AttentionPlan) -> str:
    """Path of the plan's generated backward source in the kernel cache folder (written once per
    source hash and Triton version; ``triton.jit`` reads kernel source from the file)."""
    import triton
    from attncc.codegen.cache import default_cache_dir, write_source

    source = backward_source(plan)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = default_cache_dir() / f"triton-{triton.__version__}" / f"{plan.pattern}_bwd_{digest}.py"
    if not path.exists():
        write_source(path, source)
    return str(path)


@functools.lru_cache(maxsize=128)
def load_backward_module(plan: AttentionPlan, target: str) -> ModuleType:
    """Import the plan's generated backward module for ``target`` (``interpret`` or ``cuda``),
    once per source file and target."""
    from attncc.codegen.cache import load_module

    path = backward_source_path(plan)
    mod_name = f"attncc_kernels.{target}.{os.path.basename(path)[:-3]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    return load_module(path, mod_name, target)


_TRITON_ELEM = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def backward_signatures(plan: AttentionPlan) -> dict[str, dict[str, str]]:
    """Triton types of each backward kernel's run-time arguments, in order (ahead-of-time compiles)."""
    elem = f"*{_TRITON_ELEM[plan.dtype]}"
    mask = {"bool": "*u8", "additive": elem, None: "*i64"}[plan.mask_kind]
    rows = (("q", "m"), ("k", "n"), ("v", "n"), ("do", "m"))
    strides = {f"stride_{t}{d}": "i32" for t, row in rows for d in "bh" + row}
    tables = {"PartialNum": "*i32", "PartialIdx": "*i32", "FullNum": "*i32", "FullIdx": "*i32", "Visits": "*i32"}
    common = {"Q": elem, "K": elem, "V": elem, "DO": elem, "LSE": "*fp32", "Delta": "*fp32"}
    pointers = {"MaskT": mask, "QOrder": "*i64", "KVOrder": "*i64", "HeadProgram": "*i32"}
    mask_strides = {f"stride_m{d}": "i32" for d in "bhmn"}
    return {
        "preprocess": {
            "Out": elem,
            "DOut": elem,
            "Delta": "*fp32",
            **{f"stride_{t}{d}": "i32" for t in ("o", "do") for d in "bhm"},
        },
        "dkdv": {
            **common,
            "DK": elem,
            "DV": elem,
            **pointers,
            **tables,
            **strides,
            **{f"stride_{t}{d}": "i32" for t in ("dk", "dv") for d in "bhn"},
            **mask_strides,
            "sm_scale": "fp32",
        },
        "dq": {
            **common,
            "DQ": elem,
            **pointers,
            **tables,
            **strides,
            **{f"stride_dq{d}": "i32" for d in "bhm"},
            **mask_strides,
            "sm_scale": "fp32",
        },
    }


def backward_aot_jobs(plan: AttentionPlan, arch: int, out_dir: str | os.PathLike) -> list:
    """``attncc.codegen.aot.Job``s compiling the plan's three backward kernels for ``sm_<arch>``."""
    from attncc.codegen.aot import Job

    path = backward_source_path(plan)
    names = kernel_names(plan)
    consts = backward_constexprs(plan)
    sigs = backward_signatures(plan)
    roles = ("preprocess", "dkdv", "dq")
    return [Job(path, names[r], sigs[r], consts[r], arch, str(out_dir), **launch_options(plan, r)) for r in roles]


def launch_options(plan: AttentionPlan, role: str) -> dict[str, int]:
    """``num_warps`` / ``num_stages`` of a backward kernel (the launcher and the AOT compiles agree).
    Not tuned on hardware yet: the forward's rule, more warps past head dim 128."""
    return {
        "num_warps": 8 if max(plan.head_dim, plan.head_dim_v) > 128 else 4,
        "num_stages": 1 if role == "preprocess" else 2,
    }


def write_backward_kernels(
    folder: str | os.PathLike, plans: list[AttentionPlan], *, archs: tuple[int, ...] = (90,), aot: bool = True
) -> list[dict]:
    """Dump the plans' backward kernels into ``folder``: ``<pattern>_bwd_<hash>.py`` (the source
    Triton runs) and, when ``aot``, ``<pattern>_bwd_<hash>/sm_<arch>/<kernel>.{ttir,ttgir,ptx,cubin}``
    compiled without a GPU. One manifest entry per distinct plan; a kernel that fails to compile
    carries its error instead of files."""
    import pathlib
    import shutil

    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    unique = list({p.key(): p for p in plans}.values())
    entries, jobs, owners = [], [], []
    for plan in unique:
        src = pathlib.Path(backward_source_path(plan))
        shutil.copyfile(src, out / src.name)
        entry = {
            "plan_key": plan.key(),
            "pattern": plan.pattern,
            "file": src.name,
            "kernels": kernel_names(plan),
            "targets": {},
        }
        entries.append(entry)
        if aot:
            for arch in archs:
                for job in backward_aot_jobs(plan, arch, out / src.stem / f"sm_{arch}"):
                    jobs.append(job)
                    owners.append(entry)
    if jobs:
        from attncc.codegen.aot import compile_jobs

        for entry, result in zip(owners, compile_jobs(jobs)):
            result["files"] = {k: os.path.relpath(v, out) for k, v in result.get("files", {}).items()}
            entry["targets"].setdefault(result.pop("arch"), {})[result.pop("kernel")] = result
    return entries


def _next_pow2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def backward_constexprs(
    plan: AttentionPlan,
    dtype: str | None = None,
    mask_kind: str | None = None,
    *,
    interpret: bool = False,
    count_visits: bool = False,
) -> dict[str, dict]:
    """The ``tl.constexpr`` arguments of each backward kernel (``preprocess``, ``dkdv``, ``dq``) for
    tensors of ``dtype`` (default: the plan's) and a mask tensor of ``mask_kind`` (default: the
    plan's); the launcher and the ahead-of-time compiler both take them from here."""
    dtype = dtype or plan.dtype
    mask_kind = plan.mask_kind if mask_kind is None else mask_kind
    fwd = plan.block_table()
    tr = _tables(plan, torch.device("cpu")).transposed
    common = dict(
        H=plan.num_heads,
        H_KV=plan.num_kv_heads,
        GROUP=plan.gqa_group,
        Q_LEN=plan.q_len,
        KV_LEN=plan.kv_len,
        Q_OFFSET=plan.q_offset,
        NUM_Q_BLOCKS=fwd.num_q_blocks,
        NUM_KV_BLOCKS=fwd.num_kv_blocks,
        HEAD_DIM=plan.head_dim,
        HEAD_DIM_V=plan.head_dim_v,
        BLOCK_D=_next_pow2(plan.head_dim),
        BLOCK_DV=_next_pow2(plan.head_dim_v),
        BLOCK_M=plan.block_q,
        BLOCK_N=plan.block_kv,
        HAS_PERM=plan.permute is not None,
        HAS_MASK_TENSOR=mask_kind is not None,
        MASK_IS_BOOL=mask_kind == "bool",
        EVEN_Q=plan.q_len % plan.block_q == 0,
        EVEN_KV=plan.kv_len % plan.block_kv == 0,
        # the interpreter's tl.dot is wrong for low-precision inputs: upcast tiles there
        UPCAST=interpret and dtype != "float32",
        # fp32 keeps fp32 accuracy on GPUs (no TF32); fp16/bf16 use the tensor cores as they are
        INPUT_PRECISION="ieee" if dtype == "float32" else "tf32",
        COUNT_VISITS=count_visits,
    )
    return {
        "common": common,
        "preprocess": dict(
            H=plan.num_heads,
            Q_LEN=plan.q_len,
            HEAD_DIM_V=plan.head_dim_v,
            BLOCK_M=plan.block_q,
            BLOCK_DV=common["BLOCK_DV"],
        ),
        "dkdv": dict(common, MAX_PARTIAL=tr.kv_indices.shape[2], MAX_FULL=tr.full_indices.shape[2]),
        "dq": dict(common, MAX_PARTIAL=fwd.kv_indices.shape[2], MAX_FULL=fwd.full_indices.shape[2]),
    }


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
    module = load_backward_module(plan, "interpret" if interpret else "cuda")
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

    fwd, tr = tables.forward, tables.transposed
    nq, nk = fwd.num_q_blocks, fwd.num_kv_blocks
    count = visits is not None
    visit_dkdv = torch.zeros(bsz * h * nq * nk if count else 1, dtype=torch.int32, device=dev)
    visit_dq = torch.zeros_like(visit_dkdv)
    mask_kind = None if mask_tensor is None else ("bool" if mask_tensor.dtype == torch.bool else "additive")
    consts = backward_constexprs(plan, _DTYPE_NAMES[q.dtype], mask_kind, interpret=interpret, count_visits=count)

    delta = torch.empty(bsz, h, plan.q_len, dtype=torch.float32, device=dev)
    preprocess, dkdv, dq_kernel = (getattr(module, names[n]) for n in ("preprocess", "dkdv", "dq"))
    preprocess[(nq, bsz * h)](
        out,
        dout,
        delta,
        *out.stride()[:3],
        *dout.stride()[:3],
        **consts["preprocess"],
        **launch_options(plan, "preprocess"),
    )
    # dK/dV: one program per (kv block, batch x kv head), walking the transposed table
    dkdv[(nk, bsz * hkv)](
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
        **consts["dkdv"],
        **launch_options(plan, "dkdv"),
    )
    # dQ: one program per (query block, batch x head), walking the forward table
    dq_kernel[(nq, bsz * h)](
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
        **consts["dq"],
        **launch_options(plan, "dq"),
    )
    if visits is not None:
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
