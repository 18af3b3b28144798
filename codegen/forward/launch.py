"""Launch a plan's generated forward kernel: ``triton`` on CUDA tensors, ``interpret`` on CPU."""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from attncc.codegen.aot import Job, RecordingCache, compile_jobs, recorded_jobs
from attncc.codegen.cache import FORWARD, KernelCache, default_cache
from attncc.codegen.common import example_inputs, mask_argument, shape_text
from attncc.codegen.configs import (
    TileConfig,
    at_tiles,
    autotune_enabled,
    autotuned,
    cuda_arch,
    cuda_time_ms,
    fit_to_table,
    forward_candidates,
    forward_config,
    tune_key,
    tuning_cache,
)
from attncc.codegen.documents import document_argument, document_table
from attncc.codegen.forward.generate import kernel_constexprs
from attncc.ir.blocks import BlockTable
from attncc.ir.dtypes import dtype_name
from attncc.ir.plan import AttentionPlan

_device_data: dict[tuple, tuple[BlockTable, torch.Tensor, torch.Tensor | None]] = {}


def device_data(
    plan: AttentionPlan, device: torch.device, tiles: TileConfig | None = None
) -> tuple[BlockTable, torch.Tensor, torch.Tensor | None]:
    """(block table at ``tiles`` (default: the plan's blocks), head -> program int32, permutation
    int64) on ``device``, built once per plan and tile."""
    bm, bn = (plan.block_q, plan.block_kv) if tiles is None else (tiles.block_m, tiles.block_n)
    key = (plan, str(device), bm, bn)
    hit = _device_data.get(key)
    if hit is None:
        table = at_tiles(plan, bm, bn).block_table(device)
        head_to_program = torch.tensor(plan.head_to_program, dtype=torch.int32, device=device)
        order = plan.order(device)
        hit = (table, head_to_program, None if order is None else order.to(torch.int64).contiguous())
        if len(_device_data) > 256:
            _device_data.clear()
        _device_data[key] = hit
    return hit


def _check_kv_order(
    plan: AttentionPlan, q: torch.Tensor, kv_order: torch.Tensor | None, block_table: BlockTable | None
) -> torch.Tensor | None:
    """``kv_order`` contiguous, after checking it is given exactly for a plan with a run-time key
    order, with its shape, dtype and device, and with a block table over slot blocks."""
    if (kv_order is None) == plan.runtime_key_order:
        raise ValueError(
            f"plan runtime_key_order is {plan.runtime_key_order} but kv_order is "
            f"{'missing' if kv_order is None else 'given'}"
        )
    if kv_order is None:
        return None
    want = (q.shape[0], plan.num_kv_heads, plan.kv_len)
    if tuple(kv_order.shape) != want or kv_order.dtype != torch.int64 or kv_order.device != q.device:
        raise ValueError(
            f"kv_order is {kv_order.dtype} {tuple(kv_order.shape)} on {kv_order.device}; "
            f"expected int64 {want} on {q.device}"
        )
    if block_table is None:
        raise ValueError("a plan with a run-time key order needs block_table (over kernel slot blocks)")
    return kv_order.contiguous()


#: names of the per-call arguments (pointers and strides); every other argument is static per
#: (plan, device, tiles, table) and prepared once
_STRIDES = tuple(f"stride_{t}{d}" for t in "qkvo" for d in "bhsd")
_MASK_STRIDES = tuple(f"stride_m{d}" for d in "bhqk")


@dataclass(frozen=True)
class _Prepared:
    """A launch's static arguments: the kernel, its argument names in order and the values of
    every argument that does not change from call to call."""

    kernel: Any
    #: the kernel cache the kernel came from (held, so its id in the key stays its own)
    cache: KernelCache
    names: tuple[str, ...]
    static: dict[str, object]
    grid_m: int
    launch: dict[str, int]


_prepared: dict[tuple, _Prepared] = {}


_holders: dict[str, dict[torch.dtype, torch.Tensor]] = {}


def _placeholders(device: torch.device) -> dict[torch.dtype, torch.Tensor]:
    """One-element tensors standing in for absent pointer arguments, allocated once per device."""
    hit = _holders.get(str(device))
    if hit is None:
        hit = {dt: torch.zeros(1, dtype=dt, device=device) for dt in (torch.int8, torch.int32, torch.int64)}
        _holders[str(device)] = hit
    return hit


def _static_args(
    plan: AttentionPlan,
    table: BlockTable,
    head_to_program: torch.Tensor,
    order: torch.Tensor | None,
    target: str,
    count_visits: bool,
    tiles: TileConfig,
    mults: tuple[int, int],
    device: torch.device,
    static_table: bool,
) -> dict[str, object]:
    """The forward kernel's arguments that a plan, its table and the tiles fix: the block table,
    head -> program, the permutation, run-time lengths, the scale and the constexprs."""
    args: dict[str, object] = {
        "KvNumBlocks": table.kv_num_blocks.contiguous(),
        "KvIndices": table.kv_indices.contiguous(),
        "FullNumBlocks": table.full_num_blocks.contiguous(),
        "FullIndices": table.full_indices.contiguous(),
        "HeadToProgram": head_to_program,
        "Order": order if order is not None else _placeholders(device)[torch.int64],
        "qk_scale": plan.scale * math.log2(math.e),
        "Q_LEN": plan.q_len,
        "KV_LEN": plan.kv_len,
        "Q_OFFSET": plan.q_offset,
        "NUM_Q_BLOCKS": table.num_q_blocks,
        "MAX_PARTIAL": table.kv_indices.shape[-1],
        "MAX_FULL": table.full_indices.shape[-1],
    }
    q_mult, kv_mult = mults
    # a static table's rows run longest first (a run-time table keeps its order: Q_MULT programs
    # share a row there, and sorting it would cost a device sort per call)
    row_order = (q_mult, kv_mult) == (1, 1) and static_table
    args["RowOrder"] = longest_first(table) if row_order else _placeholders(device)[torch.int32]
    consts = kernel_constexprs(
        plan,
        tiles,
        q_mult=q_mult,
        kv_mult=kv_mult,
        row_order=row_order,
        count_visits=count_visits,
        dot_fp32=target == "interpret",
    )
    args.update(consts)
    return args


def longest_first(table: BlockTable) -> torch.Tensor:
    """int32 ``[programs, query blocks]``: per program its table rows by decreasing number of kv
    blocks (partial blocks count 1.5: they also evaluate the mask), ties in row order."""
    work = table.full_num_blocks.to(torch.float32) + 1.5 * table.kv_num_blocks.to(torch.float32)
    return torch.sort(-work, dim=-1, stable=True).indices.to(torch.int32).contiguous()


def _prepare(
    plan: AttentionPlan,
    cache: KernelCache,
    target: str,
    device: torch.device,
    tiles: TileConfig,
    count_visits: bool,
    block_table: BlockTable | None,
) -> _Prepared:
    """The launch's static part, cached per (plan, target, device, tiles, visits) for the plan's
    own table; built each call for a table given at run time."""
    key = (plan, target, str(device), tiles, count_visits, id(cache))
    # a recording cache (ahead-of-time compiles) must see every launch, and holds its tensors
    cacheable = block_table is None and not isinstance(cache, RecordingCache)
    hit = _prepared.get(key) if cacheable else None
    if hit is not None:
        return hit
    if block_table is None:
        table, head_to_program, order = device_data(plan, device, tiles)
        mults = (1, 1)
    else:
        table = block_table
        tiles, q_mult, kv_mult = fit_to_table(tiles, table.block_q, table.block_kv)
        mults = (q_mult, kv_mult)
        _, head_to_program, order = device_data(plan, device)
    kernel = cache.kernel(plan, target)
    static = _static_args(
        plan, table, head_to_program, order, target, count_visits, tiles, mults, device, block_table is None
    )
    grid_m = -(-plan.q_len // tiles.block_m)
    prepared = _Prepared(kernel, cache, tuple(kernel.arg_names), static, grid_m, tiles.launch())
    if cacheable:
        if len(_prepared) > 512:
            _prepared.clear()
        _prepared[key] = prepared
    return prepared


def attention_fwd(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_tensor: torch.Tensor | None = None,
    *,
    target: str | None = None,
    cache: KernelCache | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    visits: torch.Tensor | None = None,
    config: TileConfig | None = None,
    arch: int | None = None,
    block_table: BlockTable | None = None,
    kv_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan's generated kernel: ``(out [B, H, Sq, Dv], lse [B, H, Sq] fp32)``.

    ``target`` is ``cuda`` (default for CUDA tensors) or ``interpret`` (CPU tensors, Triton
    interpreter). ``config`` sets the kernel tiles and launch options; by default
    :func:`attncc.codegen.configs.forward_config` for ``arch`` (default: q's device; the
    interpreter keeps the plan's blocks), autotuned on CUDA under ``ATTNCC_AUTOTUNE=1``.
    ``out``/``lse`` may be given (tests pre-fill them with NaN); ``visits``, an int32
    ``[B * H, query tiles]`` tensor, receives the number of kv tiles each program visited.
    ``block_table`` (one row per mask program, on q's device) replaces the plan's static table:
    tables built at run time at the plan's blocks (data-dependent selection,
    :mod:`attncc.codegen.selectors`); the tiles are then clipped to divide those blocks.
    ``kv_order``, int64 ``[B, Hkv, Skv]`` (kernel slot -> model key position), is required by and
    only accepted for a plan with ``runtime_key_order``; that plan's block table (over slot blocks)
    must be given too. The model's mask tensor stays in model order. The inputs are those
    :func:`attncc.codegen.common.check_inputs` accepts (the executor table checks them).
    """
    kv_order = _check_kv_order(plan, q, kv_order, block_table)
    target = target or ("cuda" if q.device.type == "cuda" else "interpret")
    cache = cache or default_cache()
    dev = q.device
    b, h = q.shape[0], plan.num_heads
    if plan.mask_kind == "documents" and block_table is None:
        assert mask_tensor is not None
        return _documents_fwd(plan, q, k, v, mask_tensor, target, cache, out, lse, visits, config, arch)
    if out is None:
        out = torch.empty(b, h, plan.q_len, plan.head_dim_v, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(b, h, plan.q_len, dtype=torch.float32, device=dev)
    elif tuple(lse.shape) != (b, h, plan.q_len) or not lse.is_contiguous() or lse.dtype != torch.float32:
        raise ValueError("lse must be a contiguous fp32 [B, H, Sq] tensor")
    holders = _placeholders(dev)
    if plan.mask_kind == "documents":
        assert mask_tensor is not None
        mask, mask_strides = document_argument(mask_tensor)
    else:
        mask, mask_strides = mask_argument(
            mask_tensor, (b, h, plan.q_len, plan.kv_len), holders[torch.int8], torch.int8
        )
    per_call: dict[str, object] = {
        "Q": q,
        "K": k,
        "V": v,
        "Out": out,
        "Lse": lse,
        "MaskTensor": mask,
        "KvOrder": kv_order,
        "Visits": visits if visits is not None else holders[torch.int32],
    }
    per_call.update(zip(_STRIDES, (*q.stride(), *k.stride(), *v.stride(), *out.stride())))
    per_call.update(zip(_MASK_STRIDES, mask_strides))

    def launch(tiles: TileConfig) -> None:
        prep = _prepare(plan, cache, target, dev, tiles, visits is not None, block_table)
        grid = (prep.grid_m, b * h)
        if visits is not None and (tuple(visits.shape) != (b * h, grid[0]) or visits.dtype != torch.int32):
            raise ValueError(f"visits must be int32 [{b * h}, {grid[0]}] (query tiles of {tiles.block_m})")
        static = prep.static
        prep.kernel[grid](*[per_call[n] if n in per_call else static[n] for n in prep.names], **prep.launch)

    if config is None:
        if target == "cuda" and arch is None and dev.type == "cuda":
            arch = cuda_arch(dev)
        config = forward_config(plan, arch if target == "cuda" else None, dtype_name(q.dtype))
        if target == "cuda" and dev.type == "cuda" and autotune_enabled() and visits is None:
            dtype, sm = dtype_name(q.dtype), arch or 0
            key = tune_key(plan, "forward", sm, dtype, tabled=block_table is not None)
            candidates = forward_candidates(plan, sm, dtype)
            config = autotuned(key, candidates, launch, cuda_time_ms, tuning_cache(default_cache().root))
    launch(config)
    return out, lse


def _documents_fwd(plan, q, k, v, ids, target, cache, out, lse, visits, config, arch):
    """Packed documents: per batch element, the plan's table at the kernel tiles filtered to the
    block pairs whose documents meet (built on the device), then one launch over it."""
    dev = q.device
    b, h = q.shape[0], plan.num_heads
    if config is None:
        if target == "cuda" and arch is None and dev.type == "cuda":
            arch = cuda_arch(dev)
        config = forward_config(plan, arch if target == "cuda" else None, dtype_name(q.dtype))
    static, _, _ = device_data(plan, dev, config)
    if out is None:
        out = torch.empty(b, h, plan.q_len, plan.head_dim_v, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(b, h, plan.q_len, dtype=torch.float32, device=dev)
    for i in range(b):
        row = ids[i if ids.shape[0] > 1 else 0]
        table = document_table(static, row, plan.q_len, plan.q_offset, plan.kv_len)
        attention_fwd(
            plan,
            q[i : i + 1],
            k[i : i + 1],
            v[i : i + 1],
            row.unsqueeze(0),
            target=target,
            cache=cache,
            out=out[i : i + 1],
            lse=lse[i : i + 1],
            visits=None if visits is None else visits[i * h : (i + 1) * h],
            config=config,
            block_table=table,
        )
    return out, lse


def forward_aot_jobs(
    plan: AttentionPlan, arch: int, out_dir: str | os.PathLike, config: TileConfig | None = None
) -> list[Job]:
    """The ``Job`` compiling the plan's forward kernel for ``sm_<arch>`` as the JIT builds it for a
    call of the plan's shapes (batch 1, contiguous tensors) on ``config`` (default: the arch's)."""
    x = example_inputs(plan)
    kv_order = table = None
    if plan.runtime_key_order:
        kv_order = torch.zeros(1, plan.num_kv_heads, plan.kv_len, dtype=torch.int64)
        table = plan.block_table()

    def launch(cache: KernelCache) -> None:
        attention_fwd(
            plan,
            x["q"],
            x["k"],
            x["v"],
            x["mask"],
            target="cuda",
            arch=arch,
            config=config,
            cache=cache,
            block_table=table,
            kv_order=kv_order,
        )

    return recorded_jobs(launch, FORWARD, plan, arch, out_dir, shape_text(plan))


def compile_plans(
    plans: list[AttentionPlan],
    out_dir: str | os.PathLike,
    archs=(90, 80),
    cache: KernelCache | None = None,
    workers: int = 1,
) -> list[list[dict]]:
    """Per plan, one result per arch: the forward kernel compiled as the JIT builds it, files
    under ``out_dir/<kernel file stem>/sm_<arch>/``."""
    cache = cache or default_cache()
    jobs = []
    for plan in plans:
        stem = cache.source(plan).stem
        jobs += [j for a in archs for j in forward_aot_jobs(plan, a, pathlib.Path(out_dir) / stem / f"sm_{a}")]
    results = compile_jobs(jobs, workers=workers)
    return [results[i * len(archs) : (i + 1) * len(archs)] for i in range(len(plans))]
