"""Plans by key: the custom op carries only a string, the plan lives here."""

from __future__ import annotations

import threading

from attncc.ir.plan import AttentionPlan

_PLANS: dict[str, AttentionPlan] = {}
_SIZED: dict[tuple[str, int, int, int, float], AttentionPlan] = {}
#: re-specialised plans kept (decoding makes one per generated token)
_SIZED_MAX = 4096
_LOCK = threading.Lock()


def register_plan(plan: AttentionPlan) -> str:
    """Store ``plan`` and return its key (equal plans share one key)."""
    key = plan.key()
    with _LOCK:
        _PLANS.setdefault(key, plan)
    return key


def get_plan(
    key: str,
    q_len: int | None = None,
    kv_len: int | None = None,
    q_offset: int | None = None,
    scale: float | None = None,
) -> AttentionPlan:
    """The plan registered under ``key``, for a call with these lengths, first query position and
    scale (:meth:`AttentionPlan.at`: a graph compiled with dynamic shapes, or decoding over a
    cache); unspecified ones keep the plan's."""
    try:
        plan = _PLANS[key]
    except KeyError:
        raise KeyError(
            f"no attncc plan registered under '{key}' (plans live in the process that compiled the graph)"
        ) from None
    q_len = plan.q_len if q_len is None else int(q_len)
    kv_len = plan.kv_len if kv_len is None else int(kv_len)
    if q_offset is None:
        q_offset = kv_len - q_len if plan.q_positions == "end" else plan.q_offset
    scale = plan.scale if scale is None else float(scale)
    if (q_len, kv_len, q_offset, scale) == (plan.q_len, plan.kv_len, plan.q_offset, plan.scale):
        return plan
    sized_key = (key, q_len, kv_len, int(q_offset), scale)
    with _LOCK:
        hit = _SIZED.get(sized_key)
        if hit is None:
            if len(_SIZED) > _SIZED_MAX:
                _SIZED.clear()
            hit = _SIZED[sized_key] = plan.at(q_len, kv_len, int(q_offset), scale)
        return hit


def plans() -> dict[str, AttentionPlan]:
    """A copy of every registered plan by key."""
    with _LOCK:
        return dict(_PLANS)
