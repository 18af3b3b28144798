"""The custom op ``attncc::attention`` every rewritten site calls, with its fake impl and autograd rule.

``attention(q, k, v, mask, positions, scale, plan_key, executor) -> (out, lse)``: q ``[B, H, Sq, D]``,
k/v ``[B, Hkv, Skv, D]``, out ``[B, H, Sq, Dv]`` in q's dtype, lse ``[B, H, Sq]`` fp32, model token
order (the AttentionPlan layout contract). ``positions`` (int ``[Sq]``, consecutive) is where the
queries sit among the keys when the model says so per call (a static cache's
``cache_position``), else None; ``scale`` (a 0-d tensor) is the softmax scale when the model
reads it at run time (a float attribute under dynamic shapes), else None. The plan is looked up
by key in :mod:`attncc.runtime.registry` and re-specialised to the call's lengths and positions;
the executor table of :mod:`attncc.codegen.executors` runs it. The backward is the op ``attncc::attention_backward``.

:func:`attention` calls the op for a plan in hand (benchmarks, tests, eager code): the one
differentiable entry point; there is no second autograd wrapper.
"""

from __future__ import annotations

import torch

from attncc.codegen import executors
from attncc.ir.plan import AttentionPlan
from attncc.runtime import registry

Tensor = torch.Tensor


def first_position(positions: Tensor, q_len: int) -> int:
    """The first of ``q_len`` consecutive query positions (ValueError for any other tensor). Reads
    the tensor on the host: on a GPU that is one device synchronisation per call."""
    flat = positions.reshape(-1)
    if flat.numel() != q_len or flat.dtype.is_floating_point:
        raise ValueError(
            f"attncc: the query positions {tuple(positions.shape)} {positions.dtype} are not {q_len} integers"
        )
    values = [int(x) for x in flat.tolist()]
    if not values:
        return 0
    if values != list(range(values[0], values[0] + q_len)):
        raise ValueError(
            f"attncc: the query positions {values[:8]}{'...' if q_len > 8 else ''} are not consecutive; "
            "attncc places a call's queries at consecutive positions"
        )
    return values[0]


def plan_of(
    plan_key: str, q: Tensor, k: Tensor, positions: Tensor | None = None, scale: Tensor | None = None
) -> AttentionPlan:
    """The registered plan for this call: its lengths, its queries at ``positions`` when given (a
    plan that puts them at a fixed offset checks that they are there) and a run-time ``scale``."""
    s = None if scale is None else float(scale)
    if positions is None:
        return registry.get_plan(plan_key, q.shape[-2], k.shape[-2], scale=s)
    base = registry.get_plan(plan_key)
    offset = first_position(positions, q.shape[-2])
    if base.q_positions == "start" and offset != base.q_offset:
        raise ValueError(
            f"attncc: rule '{base.rule}' at {base.name or '<top>'}: the model attends top-left (SDPA is_causal: "
            f"query i sees keys 0..i) but its queries sit at positions {offset}..; this attncc cannot keep both"
        )
    return registry.get_plan(plan_key, q.shape[-2], k.shape[-2], offset, s)


@torch.library.custom_op("attncc::attention", mutates_args=())
def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    positions: Tensor | None,
    scale: Tensor | None,
    plan_key: str,
    executor: str,
) -> tuple[Tensor, Tensor]:
    out, lse = executors.run(plan_of(plan_key, q, k, positions, scale), q, k, v, mask, executor)
    return out.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, mask, positions, scale, plan_key, executor):
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
    positions: Tensor | None,
    scale: Tensor | None,
    plan_key: str,
    executor: str,
) -> tuple[Tensor, Tensor, Tensor]:
    plan = plan_of(plan_key, q, k, positions, scale)
    dq, dk, dv = executors.run_backward(plan, q, k, v, out, lse, dout, dlse, mask, executor)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_op.register_fake
def _attention_backward_fake(q, k, v, out, lse, dout, dlse, mask, positions, scale, plan_key, executor):
    # contiguous, as the real op returns them (empty_like would keep a transposed input's strides)
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, positions, scale, plan_key, executor = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, positions, scale)
    ctx.plan_key, ctx.executor = plan_key, executor


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, positions, scale = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    args = (q, k, v, out, lse, dout, dlse, mask, positions, scale, ctx.plan_key, ctx.executor)
    dq, dk, dv = torch.ops.attncc.attention_backward(*args)
    return dq, dk, dv, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    plan: AttentionPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    executor: str = "auto",
    positions: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``out`` of attention per ``plan`` through the custom op (registering the plan),
    differentiable in q, k and v; with ``return_lse``, ``(out, lse)``: the fp32 ``[B, H, Sq]``
    natural-log log-sum-exp of each row's scaled scores (``-inf`` for a row with no key), for
    merging partial attentions (context parallelism, split KV) - differentiable too."""
    out, lse = torch.ops.attncc.attention(q, k, v, mask, positions, None, registry.register_plan(plan), executor)
    return (out, lse) if return_lse else out
