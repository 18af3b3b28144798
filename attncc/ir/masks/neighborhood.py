"""``{neighborhood: {grid: [T, H, W], kernel: [kt, kh, kw]}}``: NATTEN's neighbourhood attention on a
row-major token grid. Along each axis of size G a query at coordinate a sees the k keys starting at
``clamp(a - k // 2, 0, G - k)``: the window is centred where it can be and slides inward at the
edges, so every query sees exactly kt x kh x kw keys (``tile3d``'s window shrinks there instead)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.ir.masks.args import TRIPLE_POS, need_mapping, need_triple, params
from attncc.ir.masks.base import (
    Mask,
    MaskError,
    check_grid_length,
    grid_coords,
    on_grid,
    register,
    triton_grid_coords,
)


def _parse(arg, path, child):
    form = "{grid: [T, H, W], kernel: [kt, kh, kw]} with odd kernel sizes no larger than the grid"
    need_mapping(arg, path, "neighborhood", ["grid", "kernel"], ["grid", "kernel"], form)
    grid = need_triple(arg["grid"], path + ("grid",), "neighborhood.grid", 1)
    kernel = need_triple(arg["kernel"], path + ("kernel",), "neighborhood.kernel", 1)
    for axis, (g, k) in enumerate(zip(grid, kernel)):
        if k % 2 == 0:
            raise MaskError(
                f"neighborhood.kernel[{axis}] = {k} must be odd (a window centred on the query)",
                path + ("kernel", axis),
            )
        if k > g:
            raise MaskError(
                f"neighborhood.kernel[{axis}] = {k} is larger than grid[{axis}] = {g}", path + ("kernel", axis)
            )
    return Neighborhood(grid, kernel)


@register(
    "neighborhood",
    "NATTEN: per axis, kv in [s, s + k) with s = clamp(q - k//2, 0, G - k); exactly kt*kh*kw keys",
    params({"grid": TRIPLE_POS, "kernel": TRIPLE_POS}, ["grid", "kernel"]),
    _parse,
)
@dataclass(frozen=True)
class Neighborhood(Mask):
    """NATTEN neighbourhood attention: per axis of size G with odd kernel size k, key coordinate
    b is allowed for query coordinate a iff ``s <= b < s + k`` with ``s = clamp(a - k//2, 0, G - k)``."""

    grid: tuple[int, int, int]
    kernel: tuple[int, int, int]
    kind: ClassVar[str] = "neighborhood"
    tight: ClassVar[str] = "box"

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        check_grid_length("neighborhood", self.grid, q_len, "query")
        check_grid_length("neighborhood", self.grid, kv_len, "key")

    def box_grid(self):
        return self.grid

    def _starts(self, a, axis: int):
        k = self.kernel[axis]
        return (a - k // 2).clamp(min=0, max=self.grid[axis] - k)

    def dense(self, h, q, kv, q_len, kv_len):
        self.check_lengths(q_len, kv_len)
        ok = on_grid(h, q, kv, True)
        for axis, (a, b) in enumerate(zip(grid_coords(q, self.grid), grid_coords(kv, self.grid))):
            start = self._starts(a, axis)
            ok = ok & (b >= start) & (b < start + self.kernel[axis])
        return ok

    def bounds(self, qb, kb, h):
        # the window start is non-decreasing in the query coordinate and moves by at most one per
        # step, so the keys some query of [a0, a1] sees form the run [s(a0), s(a1) + k), and the
        # keys every query sees are [s(a1), s(a0) + k): exact per axis for boxes, a product overall
        qbox, kbox = qb.box(self.grid), kb.box(self.grid)
        may = must = None
        qs, ks = qb.lo.shape, kb.lo.shape
        for axis, k in enumerate(self.kernel):
            s0, s1 = self._starts(qbox[2 * axis].reshape(qs), axis), self._starts(qbox[2 * axis + 1].reshape(qs), axis)
            b0, b1 = kbox[2 * axis].reshape(ks), kbox[2 * axis + 1].reshape(ks)
            a_may = (b1 >= s0) & (b0 < s1 + k)
            a_must = (b0 >= s1) & (b1 < s0 + k)
            may = a_may if may is None else may & a_may
            must = a_must if must is None else must & a_must
        return may, must

    def count_box_pairs(self, qbox, kbox):
        # a product over the axes: per axis, sum over query coordinates a of |[s(a), s(a)+k) ∩ [b0, b1]|
        total = torch.ones(qbox[0].shape[0], dtype=torch.int64)
        for axis, k in enumerate(self.kernel):
            a0, a1, b0, b1 = (
                t.view(-1, 1) for t in (qbox[2 * axis], qbox[2 * axis + 1], kbox[2 * axis], kbox[2 * axis + 1])
            )
            a = torch.arange(self.grid[axis]).view(1, -1)
            start = self._starts(a, axis)
            seen = (torch.minimum(start + k - 1, b1) - torch.maximum(start, b0) + 1).clamp(min=0)
            total *= torch.where((a >= a0) & (a <= a1), seen, 0).sum(1)
        return int(total.sum())

    def triton(self):
        terms = []
        coords = zip(triton_grid_coords("q_pos", self.grid), triton_grid_coords("kv_pos", self.grid))
        for axis, (a, b) in enumerate(coords):
            k = self.kernel[axis]
            start = f"tl.minimum(tl.maximum({a} - {k // 2}, 0), {self.grid[axis] - k})"
            terms.append(f"((({b} - {start}) >= 0) & (({b} - {start}) < {k}))")
        return "(" + " & ".join(terms) + ")"

    def to_spec(self):
        return {"neighborhood": {"grid": list(self.grid), "kernel": list(self.kernel)}}

    @property
    def name(self):
        return "neighborhood"
