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
    """Gradients by autograd through the dense reference (the fallback when no backward
    executor is available). ``mask`` is a constant: it gets no gradient."""
    from attncc.codegen.reference import attention_reference

    with torch.enable_grad():
        qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, lse = attention_reference(plan, qr, kr, vr, None if mask is None else mask.detach())
        outs, grads = [out], [dout.to(out.dtype)]
        if dlse is not None:
            finite = torch.isfinite(lse)
            outs.append(torch.where(finite, lse, torch.zeros_like(lse)))
            grads.append(dlse.to(lse.dtype))
        dq, dk, dv = torch.autograd.grad(outs, (qr, kr, vr), grads, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in ((dq, q), (dk, k), (dv, v)))  # type: ignore[return-value]


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
