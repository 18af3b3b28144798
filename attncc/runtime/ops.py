"""The custom op ``attncc::attention`` every rewritten site calls, with its fake impl and autograd rule.

``attention(q, k, v, mask, plan_key, executor) -> (out, lse)``: q ``[B, H, Sq, D]``, k/v
``[B, Hkv, Skv, D]``, out ``[B, H, Sq, Dv]`` in q's dtype, lse ``[B, H, Sq]`` fp32, model token
order (the AttentionPlan layout contract). The plan is looked up by key in
:mod:`attncc.runtime.registry`; the executor table of :mod:`attncc.codegen.executors` runs it.
The backward is the op ``attncc::attention_backward``.

:func:`attention` calls the op for a plan in hand (benchmarks, tests, eager code): the one
differentiable entry point; there is no second autograd wrapper.
"""

from __future__ import annotations

import torch

from attncc.codegen import executors
from attncc.ir.plan import AttentionPlan
from attncc.runtime import registry

Tensor = torch.Tensor


def plan_of(plan_key: str, q: Tensor, k: Tensor) -> AttentionPlan:
    """The registered plan, re-specialised to the lengths of ``q`` and ``k``."""
    return registry.get_plan(plan_key, q.shape[-2], k.shape[-2])


@torch.library.custom_op("attncc::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, plan_key: str, executor: str
) -> tuple[Tensor, Tensor]:
    out, lse = executors.run(plan_of(plan_key, q, k), q, k, v, mask, executor)
    return out.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, mask, plan_key, executor):
    b, h, sq, _ = q.shape
    out = q.new_empty((b, h, sq, v.shape[-1]))
    lse = q.new_empty((b, h, sq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attncc::attention_backward", mutates_args=())
def attention_backward_op(
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
    plan = plan_of(plan_key, q, k)
    dq, dk, dv = executors.run_backward(plan, q, k, v, out, lse, dout, dlse, mask, executor)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_op.register_fake
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


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, executor: str = "auto"
) -> Tensor:
    """``out`` of attention per ``plan`` through the custom op (registering the plan),
    differentiable in q, k and v."""
    out, _ = torch.ops.attncc.attention(q, k, v, mask, registry.register_plan(plan), executor)
    return out
