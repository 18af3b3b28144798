"""Non-finite keys on the CPU paths: a NaN or infinite key reaches exactly the rows that may see it.

ATen's fused CPU attention applies a mask as an additive ``-inf`` bias, and ``nan + -inf`` is
NaN: a bad key would spread to every row of a call whose bias hides it. The kernels and the
reference mask by selection (``where``), so a bad key reaches only the rows the mask lets see
it. The CPU executor matches them: it runs with the bad keys zeroed (rows that cannot see them
are exact), then recomputes the rows that may see one exactly, densely over the keys (those
rows are few when bad keys are). Checking the keys costs one pass over k, next to attention's
pass per query block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attncc.ir.plan import AttentionPlan

Tensor = torch.Tensor
Forward = Callable[[AttentionPlan, Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]


def _allowed_rows(plan: AttentionPlan, heads: Tensor, rows: Tensor | None, kv: Tensor) -> Tensor:
    """``[len(heads), len(rows) or Sq, len(kv)]`` bool: the plan's mask for these heads, query
    rows (model order; None: all) and key positions."""
    q = (torch.arange(plan.q_len) if rows is None else rows) + plan.q_offset
    out = torch.empty(heads.numel(), q.numel(), kv.numel(), dtype=torch.bool)
    programs = torch.tensor(plan.head_to_program)[heads]
    for p in programs.unique().tolist():
        sel = (programs == p).nonzero().flatten()
        dense = plan.programs[p].dense(
            heads[sel].view(-1, 1, 1), q.view(1, -1, 1), kv.view(1, 1, -1), plan.q_len, plan.kv_len
        )
        out[sel] = dense.expand(sel.numel(), q.numel(), kv.numel())
    return out


def with_nonfinite_keys(
    forward: Forward, plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``forward(plan, q, k, v, mask)``, with rows that may see a non-finite key recomputed
    exactly (as the reference computes them)."""
    bad = ~torch.isfinite(k).all(-1)  # [B, Hkv, Skv]
    if not bool(bad.any()):
        return forward(plan, q, k, v, mask)
    out, lse = forward(plan, q, torch.where(bad.unsqueeze(-1), torch.zeros((), dtype=k.dtype), k), v, mask)
    out, lse = out.clone(), lse.clone()
    g = plan.gqa_group
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    full_mask = (
        None if mask is None else torch.broadcast_to(mask, (q.shape[0], plan.num_heads, plan.q_len, plan.kv_len))
    )
    kv_all = torch.arange(plan.kv_len)
    for b, hkv in bad.any(-1).nonzero().tolist():
        keys = bad[b, hkv].nonzero().flatten()
        heads = torch.arange(hkv * g, (hkv + 1) * g)
        sees = _allowed_rows(plan, heads, None, keys)  # [g, Sq, n_bad]
        if full_mask is not None and full_mask.dtype == torch.bool:
            sees &= full_mask[b, heads][:, :, keys]
        for i, h in enumerate(heads.tolist()):
            rows = sees[i].any(-1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            allowed = _allowed_rows(plan, torch.tensor([h]), rows, kv_all)[0]  # [R, Skv]
            scores = q[b, h, rows].to(acc) @ k[b, hkv].to(acc).T * plan.scale
            if full_mask is not None:
                m = full_mask[b, h, rows]
                if m.dtype == torch.bool:
                    allowed = allowed & m
                else:
                    scores = scores + m.to(acc)
            scores = scores.masked_fill(~allowed, float("-inf"))
            row_lse = torch.logsumexp(scores, -1)
            p = torch.where(allowed, torch.exp(scores - row_lse.unsqueeze(-1)), torch.zeros((), dtype=acc))
            out[b, h, rows] = (p @ v[b, hkv].to(acc)).to(out.dtype)
            lse[b, h, rows] = row_lse.float()
    return out, lse
