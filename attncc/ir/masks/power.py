"""``{power: L}``: PowerAttention's causal power-of-two distances, plus a local window of L."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS, IntArg
from attncc.ir.masks.base import Tensor, dist_bounds, on_grid, register


def _largest_pow2_at_most(x: Tensor) -> Tensor:
    """Largest power of two <= x for int64 x >= 1 (0 where x < 1), in exact integer arithmetic."""
    y = x.clamp(min=0)
    for shift in (1, 2, 4, 8, 16, 32):
        y = y | (y >> shift)
    return y - (y >> 1)


@register("power", "d = q - kv: 0 <= d < L or d is a power of two", POS)
@dataclass(frozen=True)
class Power(IntArg):
    """PowerAttention-style causal power-of-two distances: with d = q - kv,
    ``0 <= d < local`` or ``d`` is a power of two (1, 2, 4, 8, ...).

    ``{power: 1}`` is the pure pattern (the query itself plus keys 1, 2, 4, ... back);
    a larger ``local`` adds a dense causal window of ``local`` tokens."""

    local: int
    kind: ClassVar[str] = "power"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        d = q - kv
        pow2 = (d > 0) & ((d & (d - 1)) == 0)
        return on_grid(h, q, kv, (d >= 0) & ((d < self.local) | pow2))

    def bounds(self, qb, kb, h):
        dmin, dmax = dist_bounds(qb, kb)
        # some d in [max(dmin, 0), dmax] is < local, or the largest power of two <= dmax is in range
        lo = dmin.clamp(min=0)
        top = _largest_pow2_at_most(dmax)
        may = (dmax >= 0) & ((lo < self.local) | ((top >= lo) & (top >= 1)))
        must = (dmin >= 0) & (dmax < self.local)
        return may, must

    def triton(self):
        d = "(q_pos - kv_pos)"
        return f"(({d} >= 0) & (({d} < {self.local}) | (({d} > 0) & (({d} & ({d} - 1)) == 0))))"
