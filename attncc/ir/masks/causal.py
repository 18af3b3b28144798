"""``causal``: kv <= q."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.base import Mask, dist_bounds, in_range, on_grid, register


@register("causal", "kv <= q")
@dataclass(frozen=True)
class Causal(Mask):
    """kv <= q."""

    kind: ClassVar[str] = "causal"
    tight: ClassVar[str] = "always"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, kv <= q)

    def bounds(self, qb, kb, h):
        dmin, dmax = dist_bounds(qb, kb)
        return in_range(dmin, dmax, 0, None)

    def triton(self):
        return "(kv_pos <= q_pos)"

    def to_spec(self):
        return "causal"
