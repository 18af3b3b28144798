"""``full``: every pair is allowed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.base import Mask, on_grid, on_pairs, register


@register("full", "all pairs")
@dataclass(frozen=True)
class Full(Mask):
    """Every pair: true."""

    kind: ClassVar[str] = "full"
    tight: ClassVar[str] = "always"
    distance_only: ClassVar[bool] = True
    query_free: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, True)

    def bounds(self, qb, kb, h):
        t = on_pairs(qb, kb, True)
        return t, t

    def triton(self):
        return "((q_pos >= 0) & (kv_pos >= 0))"

    def to_spec(self):
        return "full"
