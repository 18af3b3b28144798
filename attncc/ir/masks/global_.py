"""``{global: N}``: q < N or kv < N (global tokens see and are seen by everything)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS, IntArg
from attncc.ir.masks.base import on_grid, register


@register("global", "q < N or kv < N", POS)
@dataclass(frozen=True)
class Global(IntArg):
    """q < n or kv < n."""

    n: int
    kind: ClassVar[str] = "global"
    tight: ClassVar[str] = "always"

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, (q < self.n) | (kv < self.n))

    def bounds(self, qb, kb, h):
        return (qb.lo < self.n) | (kb.lo < self.n), (qb.hi < self.n) | (kb.hi < self.n)

    def triton(self):
        return f"((q_pos < {self.n}) | (kv_pos < {self.n}))"
