"""Variants of ``attncc::attention`` for selections that outlive one call (see passes/reuse.py).

Same layout contract as :mod:`attncc.runtime.ops` (q ``[B, H, Sq, D]``, k/v ``[B, Hkv, Skv, D]``, out
``[B, H, Sq, Dv]``, lse ``[B, H, Sq]`` fp32, model order); a selection is a bool tensor
``[B, H, nq, nk]`` over the plan's kernel blocks (True: the selector keeps the block pair).

* ``attention_select(q, k, v, mask, positions, scale, plan_key, executor) -> (out, lse, selected)``: a producing
  site; ``selected`` is an ordinary graph value that later sites take as an input.
* ``attention_reuse(q, k, v, mask, positions, scale, selected, plan_key, executor) -> (out, lse)``: a consuming
  site; no estimation, the selection comes in.
* ``attention_cached(q, k, v, mask, positions, scale, plan_key, dense_key, executor, cache_key, site_key,
  dense_first, refresh_every) -> (out, lse)``: call reuse; the state is in the
  :class:`attncc.runtime.selection_cache.SelectionCache` named by ``cache_key`` (outside the graph).
* ``attention_permuted(q, k, v, mask, positions, scale, plan_key, executor, segment) -> (out, lse)``: keys sorted
  by importance inside segments at run time, selection in that order.

No gradients: plans with selectors have no backward yet (autograd raises at backward time).
"""

from __future__ import annotations

import torch

from attncc.codegen import executors
from attncc.ir.selection import call_phase
from attncc.runtime import registry
from attncc.runtime.ops import plan_of
from attncc.runtime.selection_cache import get_cache

Tensor = torch.Tensor

# call reuse reads and writes Python state on every call: a CUDA graph replay would skip it
_STATEFUL = (torch.Tag.cudagraph_unsafe,)


def _fake_out(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    """The fake ``(out, lse)`` of every op here that returns those two (the rest of the arguments
    do not change their shapes)."""
    b, h, sq, _ = q.shape
    return q.new_empty((b, h, sq, v.shape[-1])), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("attncc::attention_select", mutates_args=())
def attention_select(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    positions: Tensor | None,
    scale: Tensor | None,
    plan_key: str,
    executor: str,
) -> tuple[Tensor, Tensor, Tensor]:
    plan = plan_of(plan_key, q, k, positions, scale)
    selected = executors.select(plan, q, k, v, mask, executor)
    out, lse = executors.attend(plan, q, k, v, mask, selected, executor)
    return out.contiguous(), lse.contiguous(), selected.contiguous()


@attention_select.register_fake
def _attention_select_fake(q, k, v, mask, positions, scale, plan_key, executor):
    plan = registry.get_plan(plan_key)
    b, h, sq, _ = q.shape
    nq = (sq + plan.block_q - 1) // plan.block_q
    nk = (k.shape[-2] + plan.block_kv - 1) // plan.block_kv
    out, lse = _fake_out(q, k, v)
    return out, lse, q.new_empty((b, h, nq, nk), dtype=torch.bool)


@torch.library.custom_op("attncc::attention_reuse", mutates_args=())
def attention_reuse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    positions: Tensor | None,
    scale: Tensor | None,
    selected: Tensor,
    plan_key: str,
    executor: str,
) -> tuple[Tensor, Tensor]:
    plan = plan_of(plan_key, q, k, positions, scale)
    out, lse = executors.attend(plan, q, k, v, mask, selected, executor)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("attncc::attention_cached", mutates_args=(), tags=_STATEFUL)
def attention_cached(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    positions: Tensor | None,
    scale: Tensor | None,
    plan_key: str,
    dense_key: str,
    executor: str,
    cache_key: str,
    site_key: str,
    dense_first: int,
    refresh_every: int,
) -> tuple[Tensor, Tensor]:
    plan = plan_of(plan_key, q, k, positions, scale)
    state = get_cache(cache_key).site(site_key)
    phase = call_phase(state.calls, dense_first, refresh_every)
    state.calls += 1
    if phase == "dense":
        out, lse = executors.run(plan_of(dense_key, q, k, positions, scale), q, k, v, mask, executor)
        return out.contiguous(), lse.contiguous()
    fitted = None if phase == "select" else executors.fit_selection(plan, state.selected, q)
    if fitted is None:
        fitted = executors.select(plan, q, k, v, mask, executor)
        state.refreshes += 1
    state.selected = fitted
    out, lse = executors.attend(plan, q, k, v, mask, state.selected, executor)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("attncc::attention_permuted", mutates_args=())
def attention_permuted(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    positions: Tensor | None,
    scale: Tensor | None,
    plan_key: str,
    executor: str,
    segment: int,
) -> tuple[Tensor, Tensor]:
    plan = plan_of(plan_key, q, k, positions, scale)
    out, lse = executors.run_permuted(plan, q, k, v, mask, executor, segment)
    return out.contiguous(), lse.contiguous()


for _op in (attention_reuse, attention_cached, attention_permuted):
    _op.register_fake(_fake_out)
