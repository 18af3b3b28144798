"""Exact dense gradients of the reference attention, in fp32 (fp64 for fp64 inputs): the backward oracle."""

from __future__ import annotations

import torch

from attncc.codegen.forward.reference import dense_attention
from attncc.ir.plan import AttentionPlan

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def attention_backward_reference(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
    mask_tensor: torch.Tensor | None = None,
) -> Grads:
    """Gradients ``(dq, dk, dv)`` of the reference attention's ``(out, lse)`` given ``dout``
    and, when the log-sum-exp is used downstream, ``dlse``. ``mask_tensor`` is a constant: it
    gets no gradient.

    The custom op's backward runs below the autograd dispatcher, where autograd cannot record,
    so the derivative is written out (checked against finite differences by gradcheck):
    P = softmax(S), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O) + dlse) (times the score modification's
    derivative), dQ = scale dS K,
    dK = scale dS^T Q, with the GQA group of query heads summed into each kv head. Rows with no
    allowed key get zero gradient."""
    d = dense_attention(plan, q, k, v, mask_tensor)
    do, p = dout.to(d.out.dtype), d.p
    finite = torch.isfinite(d.lse).unsqueeze(-1)
    zero = torch.zeros((), dtype=p.dtype, device=q.device)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, d.v.transpose(-1, -2))
    row = (do * d.out).sum(-1, keepdim=True)  # [B, H, Sq, 1]
    if dlse is not None:
        row = row - torch.where(finite, dlse.to(p.dtype).unsqueeze(-1), zero)
    ds = p * (dp - row)
    if plan.score_mod is not None:
        # dS of the scaled scores: through the modification (soft-capping's 1 - tanh^2)
        factor = plan.score_mod.grad_factor(torch.matmul(d.q, d.k.transpose(-1, -2)) * plan.scale)
        if factor is not None:
            ds = ds * factor
    dq = torch.matmul(ds, d.k) * plan.scale
    dk = torch.matmul(ds.transpose(-1, -2), d.q) * plan.scale  # [B, H, Skv, D] per query head
    # GQA: the query heads sharing a kv head add their contributions
    b, hkv, group = q.shape[0], plan.num_kv_heads, plan.gqa_group
    dk = dk.reshape(b, hkv, group, *dk.shape[2:]).sum(2)
    dv = dv.reshape(b, hkv, group, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
