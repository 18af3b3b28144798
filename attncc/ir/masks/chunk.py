"""``{chunk: B}``: q // B == kv // B (attention inside fixed chunks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS, need_int
from attncc.ir.masks.base import Mask, on_grid, register


@register("chunk", "q // B == kv // B", POS)
@dataclass(frozen=True)
class Chunk(Mask):
    """q // size == kv // size."""

    size: int
    kind: ClassVar[str] = "chunk"
    tight: ClassVar[str] = "contiguous"

    @classmethod
    def parse(cls, arg, path, child):
        return cls(need_int(arg, path, "chunk"))

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, q // self.size == kv // self.size)

    def bounds(self, qb, kb, h):
        s = self.size
        qlo, qhi, klo, khi = qb.lo // s, qb.hi // s, kb.lo // s, kb.hi // s
        may = (qlo <= khi) & (klo <= qhi)
        must = (qlo == qhi) & (klo == khi) & (qlo == klo)
        return may, must

    def triton(self):
        return f"((q_pos // {self.size}) == (kv_pos // {self.size}))"

    def to_spec(self):
        return {"chunk": self.size}

    @property
    def name(self):
        return f"chunk{self.size}"
