"""The custom op ``attncc::attention`` every rewritten site calls, with its fake impl and autograd rule.

``attention(q, k, v, mask, plan_key, executor) -> (out, lse)``: q ``[B, H, Sq, D]``, k/v
``[B, Hkv, Skv, D]``, out ``[B, H, Sq, Dv]`` in q's dtype, lse ``[B, H, Sq]`` fp32, model token
order (the AttentionPlan layout contract). The plan is looked up by key in
:mod:`attncc.registry`. The backward is the op ``attncc::attention_backward``: it calls
``attncc.codegen.backward.attention_backward`` when that module is importable, and otherwise
differentiates the dense reference with autograd (:func:`reference_backward`).
"""

from __future__ import annotations

import importlib

import torch

from attncc import registry
from attncc.plan import AttentionPlan

Tensor = torch.Tensor


def _plan(plan_key: str, q: Tensor, k: Tensor) -> AttentionPlan:
    return registry.get_plan(plan_key, q.shape[-2], k.shape[-2])


def _check(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attncc::attention takes 4-D q/k/v [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] != plan.num_heads or k.shape[1] != plan.num_kv_heads:
        raise ValueError(
            f"plan {plan.key()} expects {plan.num_heads} query / {plan.num_kv_heads} kv heads, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}"
        )


@torch.library.custom_op("attncc::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, plan_key: str, executor: str
) -> tuple[Tensor, Tensor]:
    from attncc.codegen.executors import run

    plan = _plan(plan_key, q, k)
    _check(plan, q, k, v)
    out, lse = run(plan, q, k, v, mask, executor)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, mask, plan_key, executor):
    b, h, sq, _ = q.shape
    out = q.new_empty((b, h, sq, v.shape[-1]))
    lse = q.new_empty((b, h, sq), dtype=torch.float32)
    return out, lse


def reference_backward(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, dlse: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact dense gradients from the reference forward (the fallback when no backward executor
    is available), in fp32 (fp64 for fp64 inputs). ``mask`` is a constant: it gets no gradient.

    The op's implementation runs below the autograd dispatcher, so the derivative of
    :func:`attention_reference` is written out: P = softmax(S), dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO * O) + dlse), dQ = scale dS K, dK = scale dS^T Q,
    with the GQA group of query heads summed into each kv head."""
    from attncc.codegen.reference import attention_reference

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = attention_reference(plan, q, k, v, mask)
    group = plan.gqa_group
    qf, do, of = q.to(acc), dout.to(acc), out.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * plan.scale
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask.to(acc)
    finite = torch.isfinite(lse).unsqueeze(-1)
    p = torch.exp(scores - torch.where(finite, lse.to(acc).unsqueeze(-1), torch.zeros((), dtype=acc)))
    allowed = plan.dense_mask(q.device).unsqueeze(0)
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask > float("-inf"))
    p = torch.where(allowed & finite, p, torch.zeros((), dtype=acc))
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    row = (do * of).sum(-1, keepdim=True)
    if dlse is not None:
        row = row - torch.where(finite, dlse.to(acc).unsqueeze(-1), torch.zeros((), dtype=acc))
    ds = p * (dp - row)
    dq = torch.matmul(ds, kf) * plan.scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * plan.scale
    b, h = q.shape[0], q.shape[1]
    hkv = h // group
    dk = dk.reshape(b, hkv, group, *dk.shape[2:]).sum(2)
    dv = dv.reshape(b, hkv, group, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward_module():
    try:
        return importlib.import_module("attncc.codegen.backward")
    except ImportError:
        return None


@torch.library.custom_op("attncc::attention_backward", mutates_args=())
def attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    mask: Tensor | None,
    plan_key: str,
    executor: str,
) -> tuple[Tensor, Tensor, Tensor]:
    plan = _plan(plan_key, q, k)
    module = _backward_module()
    lse_used = dlse is not None and bool((dlse != 0).any())
    if module is None or lse_used:
        dq, dk, dv = reference_backward(plan, q, k, v, dout, dlse if lse_used else None, mask)
    else:
        dq, dk, dv = module.attention_backward(plan, q, k, v, out, lse, dout.contiguous(), mask, executor)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, out, lse, dout, dlse, mask, plan_key, executor):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, plan_key, executor = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.plan_key, ctx.executor = plan_key, executor


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.attncc.attention_backward(q, k, v, out, lse, dout, dlse, mask, ctx.plan_key, ctx.executor)
    return dq, dk, dv, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
