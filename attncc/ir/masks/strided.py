"""``{strided: S}``: (q - kv) % S == 0, both directions (compose with causal for the past only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.ir.masks.args import POS, IntArg
from attncc.ir.masks.base import dist_bounds, on_grid, register


@register("strided", "(q - kv) % S == 0", POS)
@dataclass(frozen=True)
class Strided(IntArg):
    """(q - kv) % stride == 0 (both directions; compose with causal for the past only)."""

    stride: int
    kind: ClassVar[str] = "strided"
    tight: ClassVar[str] = "contiguous"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, (q - kv) % self.stride == 0)

    def bounds(self, qb, kb, h):
        s = self.stride
        dmin, dmax = dist_bounds(qb, kb)
        # a multiple of s lies in [dmin, dmax] iff floor(dmax / s) * s >= dmin
        may = torch.div(dmax, s, rounding_mode="floor") * s >= dmin
        must = (dmin == dmax) & (dmin % s == 0) if s > 1 else may
        return may, must

    def triton(self):
        # Triton's % follows C (sign of the dividend); take |q - kv| first.
        return f"((tl.abs(q_pos - kv_pos) % {self.stride}) == 0)"
