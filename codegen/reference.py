"""Exact dense masked attention from a plan, in fp32 (fp64 for fp64 inputs): the oracle."""

from __future__ import annotations

import torch

from attncc.plan import AttentionPlan


def attention_reference(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_tensor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32)``.

    Rows whose every key is masked give zeros and ``lse = -inf``.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = plan.gqa_group
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * plan.scale
    allowed = plan.dense_mask(q.device).unsqueeze(0)
    if mask_tensor is not None:
        if mask_tensor.dtype == torch.bool:
            allowed = allowed & mask_tensor
        else:
            scores = scores + mask_tensor.to(acc)
            allowed = allowed & (mask_tensor > float("-inf"))
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1).clamp(min=torch.finfo(acc).min))
    p = torch.where(allowed, p, torch.zeros((), dtype=acc, device=p.device))
    out = torch.matmul(p, vf)
    return out.to(q.dtype), lse.to(torch.float32)
