"""Launch a plan's decode kernels: ``triton`` on CUDA tensors, ``interpret`` on CPU."""

from __future__ import annotations

import math
import os
import pathlib

import torch

from attncc.codegen.aot import Job, recorded_jobs, write_family
from attncc.codegen.cache import DECODE, KernelCache, default_cache
from attncc.codegen.common import example_inputs, mask_argument, shape_text
from attncc.codegen.decode.generate import (
    decode_constexprs,
    decode_kernel_name,
    merge_kernel_name,
)
from attncc.codegen.decode.table import DecodeTable, decode_table, unsupported
from attncc.ir.masks.base import MaskError
from attncc.ir.plan import AttentionPlan

#: kv blocks a split takes at least (fewer splits than that are not worth their merge)
MIN_BLOCKS_PER_SPLIT = 4
#: most splits per (batch, kv head)
MAX_SPLITS = 64
_programs: dict[tuple, torch.Tensor] = {}


def num_splits(table: DecodeTable, batch_kv_heads: int, device: torch.device) -> int:
    """How many programs share one kv head's lists: enough to fill the GPU (two programs per
    multiprocessor), never fewer than ``MIN_BLOCKS_PER_SPLIT`` blocks each; one under the
    interpreter, which runs programs one after another."""
    if device.type != "cuda":
        return 1
    most = max(table.most_full, table.most_partial)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-target // max(batch_kv_heads, 1))
    return max(1, min(MAX_SPLITS, wanted, -(-most // MIN_BLOCKS_PER_SPLIT)))


def _head_to_program(plan: AttentionPlan, device: torch.device) -> torch.Tensor:
    key = (plan.programs, plan.head_to_program, str(device))
    hit = _programs.get(key)
    if hit is None:
        hit = _programs[key] = torch.tensor(plan.head_to_program, dtype=torch.int32, device=device)
    return hit


def decode_fwd(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_tensor: torch.Tensor | None = None,
    *,
    target: str | None = None,
    cache: KernelCache | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Sq, Dv], lse [B, H, Sq] fp32)`` of a plan that takes the decode path, by the
    split-KV kernel and its merge; ``splits`` overrides :func:`num_splits` (tests)."""
    target = target or ("cuda" if q.device.type == "cuda" else "interpret")
    module = (cache or default_cache()).module(plan, target, DECODE)
    kernel, merge = getattr(module, decode_kernel_name(plan)), getattr(module, merge_kernel_name(plan))
    dev = q.device
    table = decode_table(plan, dev)
    b, h = q.shape[0], plan.num_heads
    bkv = b * plan.num_kv_heads
    n_split = splits or num_splits(table, bkv, dev)
    consts = decode_constexprs(plan, dot_fp32=target == "interpret")
    rows, width = consts["BLOCK_M"], consts["BLOCK_DV"]
    out_part = torch.empty(bkv, n_split, rows, width, dtype=torch.float32, device=dev)
    lse_part = torch.empty(bkv, n_split, rows, dtype=torch.float32, device=dev)
    placeholder = torch.zeros(1, dtype=torch.int8, device=dev)
    mask, mask_strides = mask_argument(mask_tensor, (b, h, plan.q_len, plan.kv_len), placeholder, torch.int8)
    args: dict[str, object] = {
        "Q": q,
        "K": k,
        "V": v,
        "OutPart": out_part,
        "LsePart": lse_part,
        "MaskTensor": mask,
        "HeadToProgram": _head_to_program(plan, dev),
        "FullNum": table.full_num,
        "FullIdx": table.full_idx,
        "PartNum": table.part_num,
        "PartIdx": table.part_idx,
    }
    for t, x in zip("qkv", (q, k, v)):
        for dim, s in zip("bhsd", x.stride()):
            args[f"stride_{t}{dim}"] = s
    for dim, s in zip("bhqk", mask_strides):
        args[f"stride_m{dim}"] = s
    args.update(
        {
            "qk_scale": plan.scale * math.log2(math.e),
            "Q_LEN": plan.q_len,
            "KV_LEN": plan.kv_len,
            "Q_OFFSET": plan.q_offset,
            "NUM_SPLITS": n_split,
            "FULL_WIDTH": table.full_idx.shape[-1],
            "PART_WIDTH": table.part_idx.shape[-1],
            "FULL_PER_SPLIT": -(-table.most_full // n_split),
            "PART_PER_SPLIT": -(-table.most_partial // n_split),
        }
    )
    args.update(consts)
    kernel[(n_split, bkv)](**args, **LAUNCH)
    out = torch.empty(b, h, plan.q_len, plan.head_dim_v, dtype=q.dtype, device=dev)
    lse = torch.empty(b, h, plan.q_len, dtype=torch.float32, device=dev)
    merge[(bkv,)](out_part, lse_part, out, lse, *out.stride(), plan.q_len, n_split, **merge_constexprs(plan))
    return out, lse


#: launch options of the decode kernel (the launcher and the AOT compiles agree)
LAUNCH = {"num_warps": 4, "num_stages": 2}


def merge_constexprs(plan: AttentionPlan) -> dict:
    consts = decode_constexprs(plan)
    return {
        "H": plan.num_heads,
        "GROUP": plan.gqa_group,
        "HEAD_DIM_V": plan.head_dim_v,
        "BLOCK_M": consts["BLOCK_M"],
        "BLOCK_DV": consts["BLOCK_DV"],
    }


def decode_specialisation(plan: AttentionPlan) -> AttentionPlan:
    """The plan of one decode step (one query after all the plan's keys): what the dump compiles."""
    return plan.at(1, plan.kv_len, plan.kv_len - 1)


def decode_names(plan: AttentionPlan) -> dict[str, str]:
    return {"decode": decode_kernel_name(plan), "merge": merge_kernel_name(plan)}


#: splits the dump's decode compiles assume (a run-time argument; 1 would be made a constant)
AOT_SPLITS = 4


def decode_aot_jobs(plan: AttentionPlan, arch: int, out_dir: str | os.PathLike) -> list[Job]:
    """``Job``s compiling a decode step's split-KV kernel and its merge for ``sm_<arch>`` as the
    JIT builds them for one query after all the plan's keys (batch 1, ``AOT_SPLITS`` splits)."""
    step = decode_specialisation(plan)
    x = example_inputs(step)

    def launch(cache: KernelCache) -> None:
        decode_fwd(step, x["q"], x["k"], x["v"], x["mask"], target="cuda", cache=cache, splits=AOT_SPLITS)

    return recorded_jobs(launch, DECODE, step, arch, out_dir, shape_text(step) + f", {AOT_SPLITS} splits")


def _refused(plan: AttentionPlan) -> str | None:
    """Why a decode step of ``plan`` would not take the decode path (None: it would)."""
    try:
        return unsupported(decode_specialisation(plan))
    except MaskError as e:  # grid masks and permutations hold a fixed number of tokens
        return f"its decode step has no plan ({e})"


def write_decode_kernels(
    folder: str | os.PathLike, plans: list[AttentionPlan], *, archs: tuple[int, ...] = (90,), aot: bool = True
) -> tuple[list[dict], dict[str, str]]:
    """Dump the decode kernels of the plans whose decode steps take the decode path
    (:func:`attncc.codegen.aot.write_family`); the others by key with the reason they have none."""
    refused = {p.key(): why for p in plans if (why := _refused(p)) is not None}
    kept = [p for p in plans if p.key() not in refused]
    written = write_family(pathlib.Path(folder), kept, DECODE, decode_names, decode_aot_jobs, archs=archs, aot=aot)
    return written, refused
