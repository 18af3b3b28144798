"""Plans by key: the custom op carries only a string, the plan lives here."""

from __future__ import annotations

import dataclasses
import threading

from attncc.ir.plan import AttentionPlan

_PLANS: dict[str, AttentionPlan] = {}
_SIZED: dict[tuple[str, int, int], AttentionPlan] = {}
_LOCK = threading.Lock()


def register_plan(plan: AttentionPlan) -> str:
    """Store ``plan`` and return its key (equal plans share one key)."""
    key = plan.key()
    with _LOCK:
        _PLANS.setdefault(key, plan)
    return key


def get_plan(key: str, q_len: int | None = None, kv_len: int | None = None) -> AttentionPlan:
    """The plan registered under ``key``; with ``q_len``/``kv_len`` different from the plan's
    (a graph compiled with dynamic sequence lengths), the same plan re-specialised to them."""
    try:
        plan = _PLANS[key]
    except KeyError:
        raise KeyError(
            f"no attncc plan registered under '{key}' (plans live in the process that compiled the graph)"
        ) from None
    if (q_len is None or q_len == plan.q_len) and (kv_len is None or kv_len == plan.kv_len):
        return plan
    sized_key = (
        key,
        int(q_len if q_len is not None else plan.q_len),
        int(kv_len if kv_len is not None else plan.kv_len),
    )
    with _LOCK:
        if sized_key not in _SIZED:
            _SIZED[sized_key] = dataclasses.replace(plan, q_len=sized_key[1], kv_len=sized_key[2])
        return _SIZED[sized_key]


def plans() -> dict[str, AttentionPlan]:
    """A copy of every registered plan by key."""
    with _LOCK:
        return dict(_PLANS)
