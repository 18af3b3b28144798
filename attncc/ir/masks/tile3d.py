"""``{tile3d: {grid: [T, H, W], window: [t, h, w]}}``: a 3D neighbourhood on a row-major token grid
(|dt| <= t, |dh| <= h, |dw| <= w; the box shrinks at the grid's edges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.ir.masks.args import TRIPLE_NONNEG, TRIPLE_POS, need_mapping, need_triple, params
from attncc.ir.masks.base import (
    Mask,
    check_grid_length,
    grid_coords,
    in_range,
    on_grid,
    register,
    triton_grid_coords,
)


def _parse(arg, path, child):
    need_mapping(arg, path, "tile3d", ["grid", "window"], ["grid", "window"], "{grid: [T, H, W], window: [t, h, w]}")
    return Tile3D(
        need_triple(arg["grid"], path + ("grid",), "tile3d.grid", 1),
        need_triple(arg["window"], path + ("window",), "tile3d.window", 0),
    )


@register(
    "tile3d",
    "row-major T x H x W tokens: |dt| <= wt, |dh| <= wh, |dw| <= ww",
    params({"grid": TRIPLE_POS, "window": TRIPLE_NONNEG}, ["grid", "window"]),
    _parse,
)
@dataclass(frozen=True)
class Tile3D(Mask):
    """3D neighbourhood on a row-major T x H x W token grid: |dt| <= wt, |dh| <= wh, |dw| <= ww
    (``window`` holds half-extents: the box is (2wt+1) x (2wh+1) x (2ww+1))."""

    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    kind: ClassVar[str] = "tile3d"
    tight: ClassVar[str] = "box"

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        check_grid_length("tile3d", self.grid, q_len, "query")
        check_grid_length("tile3d", self.grid, kv_len, "key")

    def box_grid(self):
        return self.grid

    def dense(self, h, q, kv, q_len, kv_len):
        self.check_lengths(q_len, kv_len)
        ok = on_grid(h, q, kv, True)
        for a, b, w in zip(grid_coords(q, self.grid), grid_coords(kv, self.grid), self.window):
            ok = ok & ((a - b).abs() <= w)
        return ok

    def bounds(self, qb, kb, h):
        qbox, kbox = qb.box(self.grid), kb.box(self.grid)
        may = must = None
        qs, ks = qb.lo.shape, kb.lo.shape
        for axis, w in enumerate(self.window):
            qlo, qhi = qbox[2 * axis].reshape(qs), qbox[2 * axis + 1].reshape(qs)
            klo, khi = kbox[2 * axis].reshape(ks), kbox[2 * axis + 1].reshape(ks)
            a_may, a_must = in_range(qlo - khi, qhi - klo, -w, w)
            may = a_may if may is None else may & a_may
            must = a_must if must is None else must & a_must
        return may, must

    def count_box_pairs(self, qbox, kbox):
        # the allowed pairs of boxes are a product over the axes: multiply per-axis counts of
        # coordinate pairs (a, b) with |a - b| <= w, a in [a0, a1], b in [b0, b1]
        total = torch.ones(qbox[0].shape[0], dtype=torch.int64)
        for axis, w in enumerate(self.window):
            a0, a1, b0, b1 = (
                t.view(-1, 1) for t in (qbox[2 * axis], qbox[2 * axis + 1], kbox[2 * axis], kbox[2 * axis + 1])
            )
            d = torch.arange(-w, w + 1).view(1, -1)
            # coordinate pairs with a - b = d: a in [a0, a1] and a - d in [b0, b1]
            total *= (torch.minimum(a1, b1 + d) - torch.maximum(a0, b0 + d) + 1).clamp(min=0).sum(1)
        return int(total.sum())

    def triton(self):
        q, kv = triton_grid_coords("q_pos", self.grid), triton_grid_coords("kv_pos", self.grid)
        terms = [f"(tl.abs({a} - {b}) <= {w})" for a, b, w in zip(q, kv, self.window)]
        # parenthesised whole: `not` and `any` wrap it as one operand
        return "(" + " & ".join(terms) + ")"

    def to_spec(self):
        return {"tile3d": {"grid": list(self.grid), "window": list(self.window)}}

    @property
    def name(self):
        return "tile3d"
