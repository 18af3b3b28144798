"""Exact dense masked attention from a plan, in fp32 (fp64 for fp64 inputs): the oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.ir.documents import same_document
from attncc.ir.plan import AttentionPlan


@dataclass(frozen=True)
class Dense:
    """The dense attention of a plan in the accumulation dtype ``acc``: queries ``q``, keys and
    values repeated per query head (``k``, ``v``), masked scores (after the plan's score
    modification) (``-inf`` where not allowed),
    the allowed pairs, the probabilities ``p`` (0 on rows with no key), ``out`` and ``lse``
    (``-inf`` on rows with no key)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor
    allowed: torch.Tensor
    p: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


def dense_attention(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_tensor: torch.Tensor | None = None
) -> Dense:
    """Every intermediate of the exact attention, ``[B, H, Sq, Skv]`` (an additive mask tensor is
    a constant here: it is detached)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = plan.gqa_group
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * plan.scale
    if plan.score_mod is not None:
        scores = plan.score_mod.apply(scores, plan.q_offset)
    allowed = plan.dense_mask(q.device).unsqueeze(0)
    if mask_tensor is not None and plan.mask_kind == "documents":
        allowed = allowed & same_document(mask_tensor, plan.q_len, plan.q_offset)
    elif mask_tensor is not None:
        if mask_tensor.dtype == torch.bool:
            allowed = allowed & mask_tensor
        else:
            scores = scores + mask_tensor.detach().to(acc)
            allowed = allowed & (mask_tensor > float("-inf"))
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1).clamp(min=torch.finfo(acc).min))
    p = torch.where(allowed, p, torch.zeros((), dtype=acc, device=p.device))
    return Dense(qf, kf, vf, scores, allowed, p, torch.matmul(p, vf), lse)


def attention_reference(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_tensor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32)``.

    Rows whose every key is masked give zeros and ``lse = -inf``.
    """
    d = dense_attention(plan, q, k, v, mask_tensor)
    return d.out.to(q.dtype), d.lse.to(torch.float32)
