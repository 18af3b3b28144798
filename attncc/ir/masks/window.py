"""``{window: N}`` (q-N < kv <= q) and ``{window: {before: A, after: B}}`` (q-A <= kv <= q+B)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import NONNEG, POS, need_int, need_mapping, params
from attncc.ir.masks.base import Mask, dist_bounds, in_range, on_grid, register


def _parse(arg, path, child):
    if isinstance(arg, dict):
        form = "a length N or {before: A, after: B}"
        need_mapping(arg, path, "window", ["before", "after"], [], form)
        before = need_int(arg.get("before", 0), path + ("before",), "window.before", 0)
        after = need_int(arg.get("after", 0), path + ("after",), "window.after", 0)
        return Window(before, after)
    return Window(need_int(arg, path, "window") - 1, 0)


@register(
    "window",
    "{window: N}: q-N < kv <= q; {window: {before: A, after: B}}: q-A <= kv <= q+B",
    {"anyOf": [POS, params({"before": NONNEG, "after": NONNEG}, [])]},
    _parse,
)
@dataclass(frozen=True)
class Window(Mask):
    """q - before <= kv <= q + after. ``{window: N}`` is before=N-1, after=0."""

    before: int
    after: int
    kind: ClassVar[str] = "window"
    tight: ClassVar[str] = "contiguous"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        d = q - kv
        return on_grid(h, q, kv, (d <= self.before) & (d >= -self.after))

    def bounds(self, qb, kb, h):
        dmin, dmax = dist_bounds(qb, kb)
        return in_range(dmin, dmax, -self.after, self.before)

    def triton(self):
        return f"(((q_pos - kv_pos) <= {self.before}) & ((kv_pos - q_pos) <= {self.after}))"

    def to_spec(self):
        if self.after == 0:
            return {"window": self.before + 1}
        return {"window": {"before": self.before, "after": self.after}}

    @property
    def name(self):
        return f"window{self.before + 1}" if self.after == 0 else f"window{self.before}_{self.after}"
