"""``{block_causal: B}``: kv // B <= q // B (causal between blocks, full inside; block diffusion)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS, IntArg
from attncc.ir.masks.base import on_grid, register


@register("block_causal", "kv // B <= q // B", POS)
@dataclass(frozen=True)
class BlockCausal(IntArg):
    """kv // size <= q // size."""

    size: int
    kind: ClassVar[str] = "block_causal"
    short: ClassVar[str] = "blockcausal"
    tight: ClassVar[str] = "always"

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, kv // self.size <= q // self.size)

    def bounds(self, qb, kb, h):
        s = self.size
        return kb.lo // s <= qb.hi // s, kb.hi // s <= qb.lo // s

    def triton(self):
        return f"((kv_pos // {self.size}) <= (q_pos // {self.size}))"
