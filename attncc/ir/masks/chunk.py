"""``{chunk: B}``: q // B == kv // B (attention inside fixed chunks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS, IntArg
from attncc.ir.masks.base import on_grid, register


@register("chunk", "q // B == kv // B", POS)
@dataclass(frozen=True)
class Chunk(IntArg):
    """q // size == kv // size."""

    size: int
    kind: ClassVar[str] = "chunk"
    tight: ClassVar[str] = "contiguous"

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
