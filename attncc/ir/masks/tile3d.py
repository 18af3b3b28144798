"""``{tile3d: {grid: [T, H, W], window: [t, h, w]}}``: a 3D neighbourhood on a row-major token grid
(|dt| <= t, |dh| <= h, |dw| <= w; the box shrinks at the grid's edges). With ``text: {tokens: N,
at: start|end}`` the sequence is N text tokens before (or after) the T*H*W video tokens, as joint
text + video transformers lay it out (CogVideoX: text first; HunyuanVideo: video first): text
tokens attend to every token, every token attends to them, video tokens attend under the
window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.ir.masks.args import NONNEG, TRIPLE_NONNEG, TRIPLE_POS, need_int, need_mapping, need_triple, params
from attncc.ir.masks.base import (
    Mask,
    MaskError,
    check_grid_length,
    grid_coords,
    in_range,
    on_grid,
    register,
    triton_grid_coords,
)

_FORM = "{grid: [T, H, W], window: [t, h, w]} (and optionally text: {tokens: N, at: start|end})"


def _parse(arg, path, child):
    need_mapping(arg, path, "tile3d", ["grid", "window", "text"], ["grid", "window"], _FORM)
    grid = need_triple(arg["grid"], path + ("grid",), "tile3d.grid", 1)
    window = need_triple(arg["window"], path + ("window",), "tile3d.window", 0)
    if "text" not in arg:
        return Tile3D(grid, window)
    tp = path + ("text",)
    text = need_mapping(arg["text"], tp, "tile3d.text", ["tokens", "at"], ["tokens"], "{tokens: N, at: start|end}")
    tokens = need_int(text["tokens"], tp + ("tokens",), "tile3d.text.tokens", 0)
    at = text.get("at", "start")
    if at not in ("start", "end"):
        raise MaskError(f"tile3d.text.at is 'start' or 'end', got {at!r}", tp + ("at",))
    return TextTile3D(grid, window, tokens, at) if tokens else Tile3D(grid, window)


@register(
    "tile3d",
    "row-major T x H x W tokens: |dt| <= wt, |dh| <= wh, |dw| <= ww",
    params(
        {
            "grid": TRIPLE_POS,
            "window": TRIPLE_NONNEG,
            "text": params({"tokens": NONNEG, "at": {"enum": ["start", "end"]}}, ["tokens"]),
        },
        ["grid", "window"],
    ),
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


@dataclass(frozen=True)
class TextTile3D(Mask):
    """``tile3d`` over the video part of a joint sequence: ``text`` tokens at the ``at`` end
    (``start``: positions 0..N-1, video after; ``end``: video 0..V-1, text after). A text query
    or key allows the pair; two video tokens are allowed under ``window`` on ``grid``. Its bounds
    come from block position ranges only (a box over a run of positions is known without the
    tokens), so undecided block pairs are classified on their tokens."""

    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    text: int
    at: str = "start"
    kind: ClassVar[str] = "tile3d"

    @property
    def video(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        total = self.video + self.text
        for what, n in (("query", q_len), ("key", kv_len)):
            if n != total:
                raise MaskError(
                    f"tile3d grid {list(self.grid)} with {self.text} text tokens holds {total} tokens "
                    f"but the {what} length is {n}"
                )

    def _split(self, p):
        """(is text, video position) of positions ``p``."""
        if self.at == "start":
            return p < self.text, p - self.text
        return p >= self.video, p

    def dense(self, h, q, kv, q_len, kv_len):
        self.check_lengths(q_len, kv_len)
        tq, vq = self._split(q)
        tk, vk = self._split(kv)
        ok = tq | tk
        inside = on_grid(h, q, kv, True)
        for a, b, w in zip(
            grid_coords(vq.clamp(min=0), self.grid), grid_coords(vk.clamp(min=0), self.grid), self.window
        ):
            inside = inside & ((a - b).abs() <= w)
        return on_grid(h, q, kv, ok | inside)

    def _range_box(self, lo, hi):
        """Per block, a box holding the grid coordinates of every video position in [lo, hi]."""
        _, gh, gw = self.grid
        t_lo, t_hi = lo // (gh * gw), hi // (gh * gw)
        row_lo, row_hi = lo // gw, hi // gw
        one_row = row_lo == row_hi
        one_frame = t_lo == t_hi
        h_lo = torch.where(one_frame, (lo // gw) % gh, 0)
        h_hi = torch.where(one_frame, (hi // gw) % gh, gh - 1)
        w_lo = torch.where(one_row, lo % gw, 0)
        w_hi = torch.where(one_row, hi % gw, gw - 1)
        return (t_lo, t_hi), (h_lo, h_hi), (w_lo, w_hi)

    def bounds(self, qb, kb, h):
        n, v = self.text, self.video
        if self.at == "start":
            q_all_text, q_any_text = qb.hi < n, qb.lo < n
            k_all_text, k_any_text = kb.hi < n, kb.lo < n
            qv_lo, qv_hi = (qb.lo - n).clamp(min=0), (qb.hi - n).clamp(min=0)
            kv_lo, kv_hi = (kb.lo - n).clamp(min=0), (kb.hi - n).clamp(min=0)
        else:
            q_all_text, q_any_text = qb.lo >= v, qb.hi >= v
            k_all_text, k_any_text = kb.lo >= v, kb.hi >= v
            qv_lo, qv_hi = qb.lo.clamp(max=v - 1), qb.hi.clamp(max=v - 1)
            kv_lo, kv_hi = kb.lo.clamp(max=v - 1), kb.hi.clamp(max=v - 1)
        may = must = None
        for (a0, a1), (b0, b1), w in zip(self._range_box(qv_lo, qv_hi), self._range_box(kv_lo, kv_hi), self.window):
            a_may, a_must = in_range(a0 - b1, a1 - b0, -w, w)
            may = a_may if may is None else may & a_may
            must = a_must if must is None else must & a_must
        assert may is not None and must is not None
        # every pair with a text token is allowed: a block pair may be allowed if it holds one or
        # its video parts may be; all of it is when its queries or keys are all text, or when
        # every video pair of it is (the boxes above are those of the video parts)
        may = may | q_any_text | k_any_text
        must = q_all_text | k_all_text | must
        return may, must

    def triton(self):
        n = self.text
        if self.at == "start":
            tq, tk, q, kv = f"(q_pos < {n})", f"(kv_pos < {n})", f"(q_pos - {n})", f"(kv_pos - {n})"
        else:
            v = self.video
            tq, tk, q, kv = f"(q_pos >= {v})", f"(kv_pos >= {v})", "q_pos", "kv_pos"
        qc, kc = triton_grid_coords(q, self.grid), triton_grid_coords(kv, self.grid)
        terms = [f"(tl.abs({a} - {b}) <= {w})" for a, b, w in zip(qc, kc, self.window)]
        return "(" + f"{tq} | {tk} | (" + " & ".join(terms) + "))"

    def to_spec(self):
        spec = {"grid": list(self.grid), "window": list(self.window), "text": {"tokens": self.text, "at": self.at}}
        return {"tile3d": spec}

    @property
    def name(self):
        return f"tile3d_text{self.text}{'' if self.at == 'start' else '_end'}"
