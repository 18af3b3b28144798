"""``{chunk: B}``: q // B == kv // B (attention inside fixed chunks); ``{chunk: {size: B, shift:
S}}``: (q + S) // B == (kv + S) // B, the chunks shifted by S tokens (LongLoRA / SinkLoRA's
shifted groups, S = B / 2 on half the heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from attncc.ir.masks.args import NONNEG, POS, need_int, need_mapping, params
from attncc.ir.masks.base import Mask, MaskError, on_grid, register


def _parse(arg, path, child):
    if isinstance(arg, dict):
        form = "a size B or {size: B, shift: S} with 0 <= S < B"
        need_mapping(arg, path, "chunk", ["size", "shift"], ["size"], form)
        size = need_int(arg["size"], path + ("size",), "chunk.size")
        shift = need_int(arg.get("shift", 0), path + ("shift",), "chunk.shift", 0)
        if shift >= size:
            raise MaskError(f"chunk.shift {shift} must be smaller than chunk.size {size}", path + ("shift",))
        return Chunk(size, shift)
    return Chunk(need_int(arg, path, "chunk"))


@register(
    "chunk",
    "{chunk: B}: q // B == kv // B; {chunk: {size: B, shift: S}}: (q + S) // B == (kv + S) // B",
    {"anyOf": [POS, params({"size": POS, "shift": NONNEG}, ["size"])]},
    _parse,
)
@dataclass(frozen=True)
class Chunk(Mask):
    """(q + shift) // size == (kv + shift) // size."""

    size: int
    shift: int = 0
    kind: ClassVar[str] = "chunk"
    tight: ClassVar[str] = "contiguous"

    def dense(self, h, q, kv, q_len, kv_len):
        s, t = self.size, self.shift
        return on_grid(h, q, kv, (q + t) // s == (kv + t) // s)

    def bounds(self, qb, kb, h):
        s, t = self.size, self.shift
        qlo, qhi, klo, khi = (qb.lo + t) // s, (qb.hi + t) // s, (kb.lo + t) // s, (kb.hi + t) // s
        may = (qlo <= khi) & (klo <= qhi)
        must = (qlo == qhi) & (klo == khi) & (qlo == klo)
        return may, must

    def triton(self):
        s, t = self.size, self.shift
        if t == 0:
            return f"((q_pos // {s}) == (kv_pos // {s}))"
        return f"(((q_pos + {t}) // {s}) == ((kv_pos + {t}) // {s}))"

    def to_spec(self) -> Any:
        return {"chunk": self.size} if self.shift == 0 else {"chunk": {"size": self.size, "shift": self.shift}}

    @property
    def name(self) -> str:
        return f"chunk{self.size}" if self.shift == 0 else f"chunk{self.size}_shift{self.shift}"
