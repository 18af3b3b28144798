"""``{global: N}``: q < N or kv < N (global tokens see and are seen by everything)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS, need_int
from attncc.ir.masks.base import Mask, on_grid, register


@register("global", "q < N or kv < N", POS)
@dataclass(frozen=True)
class Global(Mask):
    """q < n or kv < n."""

    n: int
    kind: ClassVar[str] = "global"
    tight: ClassVar[str] = "always"

    @classmethod
    def parse(cls, arg, path, child):
        return cls(need_int(arg, path, "global"))

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, (q < self.n) | (kv < self.n))

    def bounds(self, qb, kb, h):
        return (qb.lo < self.n) | (kb.lo < self.n), (qb.hi < self.n) | (kb.hi < self.n)

    def triton(self):
        return f"((q_pos < {self.n}) | (kv_pos < {self.n}))"

    def to_spec(self):
        return {"global": self.n}

    @property
    def name(self):
        return f"global{self.n}"
