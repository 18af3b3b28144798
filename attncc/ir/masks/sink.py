"""``{sink: N}``: kv < N (attention sinks: the first N keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS, IntArg
from attncc.ir.masks.base import on_grid, on_pairs, register


@register("sink", "kv < N", POS)
@dataclass(frozen=True)
class Sink(IntArg):
    """kv < n."""

    n: int
    kind: ClassVar[str] = "sink"
    tight: ClassVar[str] = "always"
    query_free: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, kv < self.n)

    def bounds(self, qb, kb, h):
        return on_pairs(qb, kb, kb.lo < self.n), on_pairs(qb, kb, kb.hi < self.n)

    def triton(self):
        return f"(kv_pos < {self.n})"
