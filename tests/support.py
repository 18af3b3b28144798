"""Builders the tests share: plans, seeded inputs, the dense block map and tolerances per dtype."""

from __future__ import annotations

import torch

from attncc.ir import masks as M
from attncc.ir.dtypes import DTYPES
from attncc.ir.plan import AttentionPlan

#: forward output / log-sum-exp tolerance of a kernel against the fp32 reference, per plan dtype
OUT_ATOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2, "float64": 1e-6}
LSE_ATOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3, "float64": 1e-6}


def make_plan(
    *programs: M.Mask,
    heads: int = 2,
    kv_heads: int | None = None,
    q_len: int = 64,
    kv_len: int | None = None,
    head_dim: int = 32,
    head_dim_v: int | None = None,
    dtype: str = "float32",
    block: int = 16,
    block_kv: int | None = None,
    head_to_program: tuple[int, ...] | None = None,
    **kw,
) -> AttentionPlan:
    """A plan of ``programs`` (default ``full``); head ``h`` takes program ``min(h, last)`` unless
    ``head_to_program`` says otherwise. ``kw``: the other plan fields (permute, mask_kind, ...)."""
    programs = programs or (M.Full(),)
    if head_to_program is None:
        head_to_program = tuple(min(h, len(programs) - 1) for h in range(heads))
    return AttentionPlan(
        programs=tuple(programs),
        head_to_program=tuple(head_to_program),
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        q_len=q_len,
        kv_len=q_len if kv_len is None else kv_len,
        head_dim=head_dim,
        head_dim_v=head_dim if head_dim_v is None else head_dim_v,
        dtype=dtype,
        scale=head_dim**-0.5,
        block_q=block,
        block_kv=block_kv or block,
        **kw,
    )


def inputs(plan: AttentionPlan, batch: int = 1, seed: int = 0, device: str = "cpu", grad: bool = False):
    """Seeded ``(q, k, v, dout)`` of the plan's shapes and dtype (``dout`` for backward tests)."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[plan.dtype].torch
    shapes = [
        (batch, plan.num_heads, plan.q_len, plan.head_dim),
        (batch, plan.num_kv_heads, plan.kv_len, plan.head_dim),
        (batch, plan.num_kv_heads, plan.kv_len, plan.head_dim_v),
        (batch, plan.num_heads, plan.q_len, plan.head_dim_v),
    ]
    q, k, v, dout = (torch.randn(s, generator=g).to(device, dt) for s in shapes)
    if grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return q, k, v, dout


def nonempty_blocks(plan: AttentionPlan) -> torch.Tensor:
    """``[H, nq, nk]`` int32: 1 where the dense mask allows some pair of the block pair (kernel
    order): what a kernel may visit, computed without the block classifier."""
    dense = plan.dense_mask()
    order = plan.order()
    if order is not None:
        dense = dense[:, order][:, :, order]
    nq, nk = -(-plan.q_len // plan.block_q), -(-plan.kv_len // plan.block_kv)
    pad = torch.zeros(plan.num_heads, nq * plan.block_q, nk * plan.block_kv, dtype=torch.bool)
    pad[:, : plan.q_len, : plan.kv_len] = dense
    return pad.view(plan.num_heads, nq, plan.block_q, nk, plan.block_kv).any(4).any(2).int()
