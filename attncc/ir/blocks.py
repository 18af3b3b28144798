"""Block classification and block tables: which (query block, kv block) pairs are empty,
partial (mask evaluated) or full (mask skipped), without ever building S x S.

Classification runs coarse to fine. Blocks are grouped into super-blocks (``_FANOUT`` blocks
of the level below per axis, recursively) and each group is summarised like a block (attained
min/max position, grid box); a mask's conservative ``bounds`` hold for any token set so
summarised, so a whole EMPTY or FULL super-block pair is settled at once and only undecided
pairs are split. At the kernel's blocks, pairs the bounds prove partial (``Mask.tight``, and
masks of q - kv alone, which are exact on contiguous blocks) are settled too; the rest are
evaluated exactly on their own tokens. The result is the exact block map, the same as bounding
every pair (:func:`classify_rows`, kept as the brute-force reference).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attncc.ir.masks import All, Any_, Blocks, Full, Mask, Not, broadcast_shape

EMPTY, PARTIAL, FULL = 0, 1, 2
#: internal label: the bounds leave the pair open, evaluate it on its tokens
_REFINE = 3

#: token pairs evaluated at once when refining partial blocks exactly (bounds peak memory:
#: a few int64 temporaries of this many elements)
_REFINE_ELEMS = 1 << 20
#: block pairs bounded at once (rows of the block map per chunk = this // kv blocks)
_ROW_PAIRS = 1 << 20
#: blocks (of the level below) per axis of a super-block
_FANOUT = 8
#: the coarsest level is the first with at most this many pairs (bounded all at once)
_TOP_PAIRS = 4096
#: child pairs bounded at once while descending
_CHILD_PAIRS = 1 << 20
#: block-map cells rasterised at once when writing maps and tables
_RASTER_CELLS = 1 << 21
#: block tables are built from sorted row runs when there are at most 1/this runs per block pair
_RUNS_FRACTION = 16
#: most leaves that do not read q - kv alone for which settled combinations are enumerated
_SUBSTITUTED_LEAVES = 4


def token_blocks(length: int, block: int, order: torch.Tensor | None = None, offset: int = 0, device=None) -> Blocks:
    """Summaries of ``ceil(length / block)`` blocks; ``order[i]`` is the model position at
    kernel slot ``i`` (identity when None); ``offset`` shifts positions (query offset)."""
    nb = -(-length // block)
    pos = torch.full((nb * block,), -1, dtype=torch.int64, device=device)
    pos[:length] = (torch.arange(length, device=device) if order is None else order.to(device)) + offset
    pos = pos.view(nb, block)
    if order is None:
        lo = torch.arange(nb, device=device) * block + offset
        hi = torch.clamp(lo + block - 1, max=length - 1 + offset)
    else:
        valid = pos >= 0
        lo = torch.where(valid, pos, torch.iinfo(torch.int64).max).amin(-1)
        hi = pos.amax(-1)
    return Blocks(lo, hi, pos, length)


def _rows(b: Blocks, sl: slice) -> Blocks:
    return Blocks(b.lo[sl], b.hi[sl], b.pos[sl], b.length)


def classify_rows(
    mask: Mask, qb: Blocks, kb: Blocks, head: int = 0, q_len: int | None = None, kv_len: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, labels[rows, n_kv_blocks])`` with exact EMPTY/PARTIAL/FULL labels.

    Closed-form bounds settle most pairs; the pairs they leave open are evaluated exactly on
    their own tokens, a bounded number of elements at a time.
    """
    q_len = qb.length if q_len is None else q_len
    kv_len = kb.length if kv_len is None else kv_len
    nq, nk = qb.lo.shape[0], kb.lo.shape[0]
    step = max(1, _ROW_PAIRS // max(nk, 1))
    kcol = kb.view(rows=False)
    for r0 in range(0, nq, step):
        rows = _rows(qb, slice(r0, r0 + step))
        may, must = mask.bounds(rows.view(rows=True), kcol, head)
        shape = broadcast_shape(may.shape, must.shape)
        may, must = may.expand(shape), must.expand(shape)
        shape = (rows.lo.shape[0], nk)
        labels = torch.where(must, FULL, torch.where(may, PARTIAL, EMPTY)).to(torch.int8).expand(shape).clone()
        _refine(mask, labels, rows, kb, head, q_len, kv_len)
        yield r0, labels


def _refine(mask: Mask, labels: torch.Tensor, qb: Blocks, kb: Blocks, head: int, q_len: int, kv_len: int) -> None:
    qi, ki = (labels == PARTIAL).nonzero(as_tuple=True)
    if qi.numel() == 0:
        return
    bq, bk = qb.pos.shape[1], kb.pos.shape[1]
    step = max(1, _REFINE_ELEMS // (bq * bk))
    h = torch.tensor(head, device=qi.device).view(1, 1, 1)
    for s in range(0, qi.numel(), step):
        q_i, k_i = qi[s : s + step], ki[s : s + step]
        qpos, kpos = qb.pos[q_i], kb.pos[k_i]
        valid = (qpos >= 0)[:, :, None] & (kpos >= 0)[:, None, :]
        allowed = mask.dense(h, qpos[:, :, None], kpos[:, None, :], q_len, kv_len)
        anyv = (allowed & valid).flatten(1).any(1)
        allv = (allowed | ~valid).flatten(1).all(1)
        labels[q_i, k_i] = torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)


@dataclass
class _Axis:
    """Summaries of one axis at every level (level 0: the kernel's blocks; level l groups
    ``_FANOUT`` blocks of level l - 1): attained min/max position, valid tokens, grid boxes."""

    leaf: Blocks
    lo: list[torch.Tensor]
    hi: list[torch.Tensor]
    count: list[torch.Tensor]
    #: per level: grid -> (box tensors, True where the block fills its box)
    boxes: list[dict[tuple[int, int, int], tuple[tuple[torch.Tensor, ...], torch.Tensor]]]
    contiguous: bool

    def size(self, level: int) -> int:
        return self.lo[level].shape[0]

    def blocks(self, level: int, idx: torch.Tensor) -> Blocks:
        """The blocks ``idx`` (any shape) of ``level``, summarised with ``lo`` shaped like ``idx``."""
        boxes = tuple((g, tuple(t[idx] for t in box)) for g, (box, _) in self.boxes[level].items())
        return Blocks(self.lo[level][idx], self.hi[level][idx], self.leaf.pos, self.leaf.length, boxes)


def _group(x: torch.Tensor, fill: int, op: str) -> torch.Tensor:
    """Reduce consecutive groups of ``_FANOUT`` entries (the last group padded with ``fill``)."""
    n = x.shape[0]
    m = -(-n // _FANOUT)
    y = torch.cat([x, x.new_full((m * _FANOUT - n,), fill)]).view(m, _FANOUT)
    return y.amin(1) if op == "min" else y.amax(1) if op == "max" else y.sum(1)


def _fills_box(box: tuple[torch.Tensor, ...], count: torch.Tensor) -> torch.Tensor:
    return count == (box[1] - box[0] + 1) * (box[3] - box[2] + 1) * (box[5] - box[4] + 1)


def _axis(leaf: Blocks, levels: int, grids: list[tuple[int, int, int]], contiguous: bool) -> _Axis:
    big = torch.iinfo(torch.int64).max
    lo, hi, count = [leaf.lo], [leaf.hi], [(leaf.pos >= 0).sum(1)]
    boxes = [{g: (box, _fills_box(box, count[0])) for g in grids for box in (leaf.box(g),)}]
    for _ in range(levels):
        lo.append(_group(lo[-1], big, "min"))
        hi.append(_group(hi[-1], -1, "max"))
        count.append(_group(count[-1], 0, "sum"))
        level = {}
        for g, (box, _) in boxes[-1].items():
            up = tuple(_group(t, big, "min") if i % 2 == 0 else _group(t, -1, "max") for i, t in enumerate(box))
            level[g] = (up, _fills_box(up, count[-1]))
        boxes.append(level)
    return _Axis(leaf, lo, hi, count, boxes, contiguous)


_Bounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _Bounder:
    """``(may, must, exact)`` of a mask over block pairs at any level. ``exact`` marks pairs whose
    label the bounds settle exactly: EMPTY (not may), FULL (must), or PARTIAL (may, not must)."""

    def __init__(self, mask: Mask, head: int, qa: _Axis, ka: _Axis, q_len: int, kv_len: int, q_offset: int):
        self.mask, self.head, self.qa, self.ka = mask, head, qa, ka
        self.q_len, self.kv_len = q_len, kv_len
        self.contiguous = qa.contiguous and ka.contiguous
        # every d = q - kv lies in [base, top]
        self.base, self.top = q_offset - (kv_len - 1), q_offset + q_len - 1
        self._prefix: dict[Mask, torch.Tensor] = {}
        self._distance_only: dict[int, bool] = {}
        # on contiguous blocks, a pair where every leaf that reads more than q - kv is settled
        # (EMPTY or FULL) sees a predicate of q - kv alone: substitute and count exactly
        self._others: list[Mask] = []
        if self.contiguous and not mask.reads_distance_only:
            leaves = [m for m in mask.walk() if not m.children() and not m.distance_only]
            distinct = list(dict.fromkeys(leaves))
            if len(distinct) <= _SUBSTITUTED_LEAVES and len(distinct) < len(list(mask.walk())):
                self._others = distinct
        self._leaf_bounds: dict[Mask, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, level: int, qi: torch.Tensor, ki: torch.Tensor) -> _Bounds:
        qb, kb = self.qa.blocks(level, qi), self.ka.blocks(level, ki)
        shape = broadcast_shape(qi.shape, ki.shape)
        self._leaf_bounds = {}
        may, must, exact = self._node(self.mask, qb, kb, level, qi, ki)
        may, must, exact = may.expand(shape), must.expand(shape), exact.expand(shape)
        if level == 0 and self._others:
            may, must, exact = self._substituted(qb, kb, may, must, exact)
        self._leaf_bounds = {}
        return may, must, exact

    def _substituted(self, qb: Blocks, kb: Blocks, may, must, exact) -> _Bounds:
        """Settle open pairs whose other leaves are all settled, by the q - kv predicate left."""
        open_pairs = may & ~must & ~exact
        if not bool(open_pairs.any()):
            return may, must, exact
        code = torch.zeros(open_pairs.shape, dtype=torch.int64)
        settled = open_pairs.clone()
        for bit, leaf in enumerate(self._others):
            leaf_may, leaf_must = self._leaf_bounds[leaf]
            settled &= ~leaf_may | leaf_must
            code += leaf_must.to(torch.int64) << bit
        if not bool(settled.any()):
            return may, must, exact
        may, must, exact = may.clone(), must.clone(), exact.clone()
        for value in code[settled].unique().tolist():
            where = settled & (code == value)
            constants = {leaf: bool(value >> bit & 1) for bit, leaf in enumerate(self._others)}
            rest = _substitute(self.mask, constants)
            a_may, a_must, _ = self._distance(rest, qb, kb)
            a_may, a_must = a_may.expand(where.shape), a_must.expand(where.shape)
            may[where], must[where], exact[where] = a_may[where], a_must[where], True
        return may, must, exact

    def _node(self, node: Mask, qb: Blocks, kb: Blocks, level: int, qi: torch.Tensor, ki: torch.Tensor) -> _Bounds:
        key = id(node)
        if key not in self._distance_only:
            self._distance_only[key] = node.reads_distance_only
        if self.contiguous and self._distance_only[key]:
            return self._distance(node, qb, kb)
        if isinstance(node, (All, Any_)):
            return _combine([self._node(c, qb, kb, level, qi, ki) for c in node.items], isinstance(node, All))
        if isinstance(node, Not):
            may, must, exact = self._node(node.item, qb, kb, level, qi, ki)
            return ~must, ~may, exact
        may, must = node.bounds(qb, kb, self.head)
        if node in self._others:
            self._leaf_bounds[node] = (may, must)
        if node.tight == "always" or (node.tight == "contiguous" and self.contiguous):
            return may, must, torch.ones((), dtype=torch.bool)
        exact = ~may | must
        grid = node.box_grid()
        if node.tight == "box" and grid is not None:
            exact = exact | (self.qa.boxes[level][grid][1][qi] & self.ka.boxes[level][grid][1][ki])
        return may, must, exact

    def _distance(self, node: Mask, qb: Blocks, kb: Blocks) -> _Bounds:
        """A predicate of d = q - kv on runs of consecutive positions: every d in
        [q_lo - kv_hi, q_hi - kv_lo] occurs, so counting the allowed d in it is exact."""
        prefix = self._prefix.get(node)
        if prefix is None:
            d = torch.arange(self.base, self.top + 1)
            h = torch.tensor([self.head])
            allowed = node.dense(h, d, torch.zeros(1, dtype=torch.int64), self.q_len, self.kv_len).reshape(-1)
            prefix = torch.zeros(d.numel() + 1, dtype=torch.int64)
            torch.cumsum(allowed, 0, out=prefix[1:])
            self._prefix[node] = prefix
        a, b = qb.lo - kb.hi, qb.hi - kb.lo
        n = prefix[b - self.base + 1] - prefix[a - self.base]
        return n > 0, n == b - a + 1, torch.ones((), dtype=torch.bool)


def _substitute(node: Mask, constants: dict[Mask, bool]) -> Mask:
    """``node`` with the leaves in ``constants`` replaced by ``full`` / ``not full``."""
    if node in constants:
        return Full() if constants[node] else Not(Full())
    if isinstance(node, (All, Any_)):
        return type(node)(tuple(_substitute(c, constants) for c in node.items))
    if isinstance(node, Not):
        return Not(_substitute(node.item, constants))
    return node


def _combine(parts: list[_Bounds], conj: bool) -> _Bounds:
    """``all`` (conj) or ``any`` of children bounds. The result is exact where it is settled, or
    where every child is exact and at most one child is not FULL (all) / not EMPTY (any)."""
    may, must, exact = parts[0]
    if conj:
        open_children = (~must).to(torch.int8)
    else:
        open_children = may.to(torch.int8)
    for p_may, p_must, p_exact in parts[1:]:
        if conj:
            may, must = may & p_may, must & p_must
            open_children = open_children + (~p_must).to(torch.int8)
        else:
            may, must = may | p_may, must | p_must
            open_children = open_children + p_may.to(torch.int8)
        exact = exact & p_exact
    return may, must, ~may | must | (exact & (open_children <= 1))


def _exact_labels(
    mask: Mask, qb: Blocks, kb: Blocks, head: int, q_len: int, kv_len: int, qi: torch.Tensor, ki: torch.Tensor
) -> torch.Tensor:
    """EMPTY/PARTIAL/FULL of kernel block pairs ``(qi[i], ki[i])``, evaluated on their tokens."""
    out = torch.empty(qi.shape[0], dtype=torch.int8)
    bq, bk = qb.pos.shape[1], kb.pos.shape[1]
    step = max(1, _REFINE_ELEMS // (bq * bk))
    h = torch.tensor(head).view(1, 1, 1)
    for s in range(0, qi.numel(), step):
        qpos, kpos = qb.pos[qi[s : s + step]], kb.pos[ki[s : s + step]]
        valid = (qpos >= 0)[:, :, None] & (kpos >= 0)[:, None, :]
        allowed = mask.dense(h, qpos[:, :, None], kpos[:, None, :], q_len, kv_len)
        anyv = (allowed & valid).flatten(1).any(1)
        allv = (allowed | ~valid).flatten(1).all(1)
        out[s : s + step] = torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)
    return out


@dataclass
class _Settled:
    """The exact block map of one mask, compactly: FULL rectangles of blocks settled above the
    kernel's blocks (half-open rows r0:r1, cols c0:c1) and label tiles ``[m, a, b]`` at the
    kernel's blocks whose top-left block is (tile_r0, tile_c0); cells past the map are EMPTY."""

    nq: int
    nk: int
    rect_r0: torch.Tensor
    rect_r1: torch.Tensor
    rect_c0: torch.Tensor
    rect_c1: torch.Tensor
    tile_r0: torch.Tensor
    tile_c0: torch.Tensor
    tiles: torch.Tensor

    def tile_cells(self, tiles: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [m, a, 1], cols [m, 1, b], labels [m, a, b]) of the selected tiles."""
        lab = self.tiles[tiles]
        rows = self.tile_r0[tiles].view(-1, 1, 1) + torch.arange(lab.shape[1]).view(1, -1, 1)
        cols = self.tile_c0[tiles].view(-1, 1, 1) + torch.arange(lab.shape[2]).view(1, 1, -1)
        return rows, cols, lab

    def raster(self, r0: int, r1: int, out: torch.Tensor) -> None:
        """Write block-map rows ``r0:r1`` into ``out`` ``[r1 - r0, nk]`` int8."""
        out.zero_()
        sel = (self.rect_r0 < r1) & (self.rect_r1 > r0)
        if bool(sel.any()):
            start = self.rect_r0[sel].clamp(min=r0)
            height = self.rect_r1[sel].clamp(max=r1) - start
            first = torch.cumsum(height, 0) - height
            rows = start.repeat_interleave(height) + torch.arange(int(height.sum())) - first.repeat_interleave(height)
            # rectangles are disjoint: +1 at each run's first column, -1 past its last, then a running sum
            edge = torch.zeros(r1 - r0, self.nk + 1, dtype=torch.int8)
            ones = torch.ones(rows.shape[0], dtype=torch.int8)
            edge.index_put_((rows - r0, self.rect_c0[sel].repeat_interleave(height)), ones, accumulate=True)
            edge.index_put_((rows - r0, self.rect_c1[sel].repeat_interleave(height)), -ones, accumulate=True)
            torch.cumsum(edge[:, : self.nk], 1, dtype=torch.int8, out=out)
            out.mul_(FULL)
        if self.tiles.shape[0]:
            a = self.tiles.shape[1]
            lo = int(torch.searchsorted(self.tile_r0, r0 - a + 1))
            hi = int(torch.searchsorted(self.tile_r0, r1))
            if hi > lo and self.tiles.shape[1:] == (_FANOUT, _FANOUT) and r0 % _FANOUT == 0:
                # tiles of the descent sit on a _FANOUT grid: place them whole, then lay the grid out
                # row-major (tile cells and settled rectangles are disjoint, so adding merges them)
                groups = torch.zeros(
                    -(-(r1 - r0) // _FANOUT), -(-self.nk // _FANOUT), _FANOUT, _FANOUT, dtype=torch.int8
                )
                groups[(self.tile_r0[lo:hi] - r0) // _FANOUT, self.tile_c0[lo:hi] // _FANOUT] = self.tiles[lo:hi]
                cells = groups.permute(0, 2, 1, 3).reshape(groups.shape[0] * _FANOUT, -1)
                out += cells[: r1 - r0, : self.nk]
            elif hi > lo:
                rows, cols, lab = self.tile_cells(slice(lo, hi))
                keep = (lab != EMPTY) & (rows >= r0) & (rows < r1) & (cols < self.nk)
                out[rows.expand_as(lab)[keep] - r0, cols.expand_as(lab)[keep]] = lab[keep]

    def row_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block: (partial blocks, full blocks), int64 ``[nq]``."""
        full = torch.zeros(self.nq + 1, dtype=torch.int64)
        width = self.rect_c1 - self.rect_c0
        full.index_add_(0, self.rect_r0, width)
        full.index_add_(0, self.rect_r1, -width)
        full = torch.cumsum(full, 0)[: self.nq]
        partial = torch.zeros(self.nq, dtype=torch.int64)
        if self.tiles.shape[0]:
            rows, _, lab = self.tile_cells()
            rows = rows.squeeze(2)
            ok = rows < self.nq
            partial.index_add_(0, rows[ok], (lab == PARTIAL).sum(2)[ok])
            full.index_add_(0, rows[ok], (lab == FULL).sum(2)[ok])
        return partial, full

    def runs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-empty cells as row runs ``(row, c0, c1, label)`` sorted by (row, c0): a FULL run per
        row of each rectangle and one run per non-empty tile cell."""
        height = self.rect_r1 - self.rect_r0
        first = torch.cumsum(height, 0) - height
        rows = (
            self.rect_r0.repeat_interleave(height) + torch.arange(int(height.sum())) - first.repeat_interleave(height)
        )
        rect_cols = (self.rect_c0.repeat_interleave(height), self.rect_c1.repeat_interleave(height))
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | int]] = [(rows, *rect_cols, FULL)]
        if self.tiles.shape[0]:
            t_rows, t_cols, lab = self.tile_cells()
            t_rows, t_cols = t_rows.expand_as(lab), t_cols.expand_as(lab)
            keep = (lab != EMPTY) & (t_rows < self.nq) & (t_cols < self.nk)
            parts.append((t_rows[keep], t_cols[keep], t_cols[keep] + 1, lab[keep].long()))
        row = torch.cat([p[0] for p in parts])
        c0 = torch.cat([p[1] for p in parts])
        c1 = torch.cat([p[2] for p in parts])
        label = torch.cat([torch.full_like(p[0], p[3]) if isinstance(p[3], int) else p[3] for p in parts])
        order = torch.argsort(row * (self.nk + 1) + c0)
        return row[order], c0[order], c1[order], label[order]

    def num_runs(self) -> int:
        """How many runs :meth:`runs` lists (to choose between runs and rasterising)."""
        return int((self.rect_r1 - self.rect_r0).sum()) + int((self.tiles != EMPTY).sum())

    def row_chunk(self) -> int:
        rows = max(1, _RASTER_CELLS // max(self.nk, 1))
        return max(_FANOUT, rows // _FANOUT * _FANOUT)


def _settle(
    mask: Mask,
    qb: Blocks,
    kb: Blocks,
    head: int,
    q_len: int,
    kv_len: int,
    q_offset: int,
    contiguous: bool,
) -> _Settled:
    """Coarse-to-fine exact classification of every (query block, kv block) pair."""
    nq, nk = qb.lo.shape[0], kb.lo.shape[0]
    levels = 0
    while -(-nq // _FANOUT**levels) * -(-nk // _FANOUT**levels) > _TOP_PAIRS:
        levels += 1
    grids = sorted({g for m in mask.walk() if (g := m.box_grid()) is not None})
    qa, ka = _axis(qb, levels, grids, contiguous), _axis(kb, levels, grids, contiguous)
    bounder = _Bounder(mask, head, qa, ka, q_len, kv_len, q_offset)
    rects: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    tiles: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def leaf_labels(may, must, exact, qi, ki):
        labels = torch.where(must, FULL, torch.where(may, torch.where(exact, PARTIAL, _REFINE), EMPTY))
        labels = labels.to(torch.int8)
        open_pairs = (labels == _REFINE).nonzero(as_tuple=True)
        if open_pairs[0].numel():
            qs, ks = qi.expand(labels.shape)[open_pairs], ki.expand(labels.shape)[open_pairs]
            labels[open_pairs] = _exact_labels(mask, qb, kb, head, q_len, kv_len, qs, ks)
        return labels

    def descend(level: int, pq: torch.Tensor, pk: torch.Tensor) -> None:
        child = torch.arange(_FANOUT)
        step = max(1, _CHILD_PAIRS // _FANOUT**2)
        for s in range(0, pq.numel(), step):
            cq, ck = pq[s : s + step, None] * _FANOUT + child, pk[s : s + step, None] * _FANOUT + child
            valid = (cq < qa.size(level - 1))[:, :, None] & (ck < ka.size(level - 1))[:, None, :]
            cq, ck = cq.clamp(max=qa.size(level - 1) - 1), ck.clamp(max=ka.size(level - 1) - 1)
            may, must, exact = bounder(level - 1, cq[:, :, None], ck[:, None, :])
            may, must = may & valid, must & valid
            if level == 1:
                keep_labels = leaf_labels(may, must, exact, cq[:, :, None], ck[:, None, :])
                keep = keep_labels.flatten(1).ne(EMPTY).any(1)
                tiles.append((cq[keep, 0], ck[keep, 0], keep_labels[keep]))
                continue
            t, a, b = must.nonzero(as_tuple=True)
            rects.append((level - 1, cq[t, a], ck[t, b]))
            t, a, b = (may & ~must).nonzero(as_tuple=True)
            if t.numel():
                descend(level - 1, cq[t, a], ck[t, b])

    qi, ki = torch.arange(qa.size(levels)).view(-1, 1), torch.arange(ka.size(levels)).view(1, -1)
    may, must, exact = bounder(levels, qi, ki)
    if levels == 0:
        labels = leaf_labels(may, must, exact, qi, ki)
        tiles.append((torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), labels[None]))
    else:
        r, c = must.nonzero(as_tuple=True)
        rects.append((levels, r, c))
        r, c = (may & ~must).nonzero(as_tuple=True)
        if r.numel():
            descend(levels, r, c)

    return _assemble(nq, nk, rects, tiles)


def _assemble(
    nq: int,
    nk: int,
    rects: list[tuple[int, torch.Tensor, torch.Tensor]],
    tiles: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> _Settled:
    """A :class:`_Settled` from the FULL super-blocks (level, row, col) and the label tiles the
    descent found."""

    def span(level: int, idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = _FANOUT**level
        return idx * size, torch.clamp(idx * size + size, max=n)

    none = torch.zeros(0, dtype=torch.int64)
    r0s, r1s, c0s, c1s = [none], [none], [none], [none]
    for level, r, c in rects:
        (r0, r1), (c0, c1) = span(level, r, nq), span(level, c, nk)
        r0s.append(r0)
        r1s.append(r1)
        c0s.append(c0)
        c1s.append(c1)
    if tiles:
        tile_r0, tile_c0, labels = (torch.cat(x) for x in zip(*tiles))
        order = torch.argsort(tile_r0, stable=True)
        tile_r0, tile_c0, labels = tile_r0[order], tile_c0[order], labels[order]
    else:
        tile_r0, tile_c0 = none, none
        labels = torch.zeros(0, _FANOUT, _FANOUT, dtype=torch.int8)
    return _Settled(nq, nk, torch.cat(r0s), torch.cat(r1s), torch.cat(c0s), torch.cat(c1s), tile_r0, tile_c0, labels)


def _settle_mask(
    mask: Mask,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    head: int,
    q_order: torch.Tensor | None,
    kv_order: torch.Tensor | None,
    q_offset: int,
) -> tuple[_Settled, Blocks, Blocks]:
    qb = token_blocks(q_len, block_q, q_order, q_offset)
    kb = token_blocks(kv_len, block_kv, kv_order)
    contiguous = q_order is None and kv_order is None
    return _settle(mask, qb, kb, head, q_len, kv_len, q_offset, contiguous), qb, kb


def classify(
    mask: Mask,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    head: int = 0,
    q_order: torch.Tensor | None = None,
    kv_order: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Block map ``[nq, nk]`` int8 of EMPTY/PARTIAL/FULL in kernel (permuted) order."""
    settled, _, _ = _settle_mask(mask, q_len, kv_len, block_q, block_kv, head, q_order, kv_order, q_offset)
    out = torch.empty(settled.nq, settled.nk, dtype=torch.int8)
    step = settled.row_chunk()
    for r0 in range(0, settled.nq, step):
        r1 = min(r0 + step, settled.nq)
        settled.raster(r0, r1, out[r0:r1])
    return out


@dataclass
class BlockTable:
    """Per (mask program, query block): kv blocks to visit with the mask (partial) and
    without it (full), FlexAttention-style. Indices are in kernel (permuted) order, sorted."""

    kv_num_blocks: torch.Tensor  # [M, nq] int32
    kv_indices: torch.Tensor  # [M, nq, max_partial] int32
    full_num_blocks: torch.Tensor  # [M, nq] int32
    full_indices: torch.Tensor  # [M, nq, max_full] int32
    block_q: int
    block_kv: int
    num_kv_blocks: int

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[1]

    def visited(self) -> torch.Tensor:
        """[M] number of (query block, kv block) pairs a kernel visits per mask program."""
        return (self.kv_num_blocks.long() + self.full_num_blocks.long()).sum(1)

    def block_density(self) -> torch.Tensor:
        return self.visited().double() / (self.num_q_blocks * self.num_kv_blocks)

    def to(self, device) -> BlockTable:
        return BlockTable(
            self.kv_num_blocks.to(device),
            self.kv_indices.to(device),
            self.full_num_blocks.to(device),
            self.full_indices.to(device),
            self.block_q,
            self.block_kv,
            self.num_kv_blocks,
        )

    def transposed(self) -> BlockTable:
        """The same pairs listed per kv block (query blocks per kv block), for backward passes."""
        m, nq = self.kv_num_blocks.shape
        nk = self.num_kv_blocks
        lists = []
        for counts, idx in ((self.kv_num_blocks, self.kv_indices), (self.full_num_blocks, self.full_indices)):
            per_mask = []
            for mi in range(m):
                pairs = _pairs(counts[mi], idx[mi])
                per_mask.append((pairs[:, 1], pairs[:, 0]))
            lists.append(_pack(per_mask, nk))
        (pn, pi), (fn, fi) = lists
        return BlockTable(pn, pi, fn, fi, self.block_kv, self.block_q, nq)


def _pairs(counts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[(row, col)] from a padded per-row list."""
    width = idx.shape[1]
    keep = torch.arange(width, device=idx.device).view(1, -1) < counts.view(-1, 1).long()
    rows = torch.arange(counts.shape[0], device=idx.device).view(-1, 1).expand_as(idx)
    return torch.stack([rows[keep], idx[keep].long()], 1)


def _pack(per_mask: list[tuple[torch.Tensor, torch.Tensor]], nrows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (row, col) lists into padded, col-sorted [M, nrows] counts and [M, nrows, width] indices."""
    m = len(per_mask)
    counts = torch.zeros(m, nrows, dtype=torch.int32)
    width = 1
    for mi, (r, _) in enumerate(per_mask):
        if r.numel():
            counts[mi] = torch.bincount(r, minlength=nrows).to(torch.int32)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    idx = torch.zeros(m, nrows, width, dtype=torch.int32)
    for mi, (r, c) in enumerate(per_mask):
        if r.numel() == 0:
            continue
        order = torch.argsort(r * (c.max() + 1) + c)
        r, c = r[order], c[order]
        start = torch.cumsum(counts[mi].long(), 0) - counts[mi].long()
        slot = torch.arange(r.numel()) - start[r]
        idx[mi, r, slot] = c.to(torch.int32)
    return counts, idx


def build_block_table(
    masks: list[Mask],
    heads: list[int],
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    q_order: torch.Tensor | None = None,
    kv_order: torch.Tensor | None = None,
    q_offset: int = 0,
) -> BlockTable:
    """Block table for mask programs ``masks`` (``heads[i]`` is the head index used for
    head-dependent masks of program ``i``)."""
    settled = [
        _settle_mask(mask, q_len, kv_len, block_q, block_kv, head, q_order, kv_order, q_offset)[0]
        for mask, head in zip(masks, heads)
    ]
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    counts = [st.row_counts() for st in settled]
    pn = torch.stack([p for p, _ in counts]).to(torch.int32) if counts else torch.zeros(0, nq, dtype=torch.int32)
    fn = torch.stack([f for _, f in counts]).to(torch.int32) if counts else torch.zeros(0, nq, dtype=torch.int32)
    pi = torch.zeros(len(masks), nq, max(1, int(pn.max()) if pn.numel() else 1), dtype=torch.int32)
    fi = torch.zeros(len(masks), nq, max(1, int(fn.max()) if fn.numel() else 1), dtype=torch.int32)
    for mi, st in enumerate(settled):
        # sparse maps: expand sorted row runs; dense ones (many partial cells): rasterise row chunks
        if st.num_runs() * _RUNS_FRACTION <= st.nq * st.nk:
            _fill_from_runs(st, mi, pn, pi, fn, fi)
            continue
        step = st.row_chunk()
        buf = torch.empty(step, nk, dtype=torch.int8)
        for r0 in range(0, nq, step):
            r1 = min(r0 + step, nq)
            rows = buf[: r1 - r0]
            st.raster(r0, r1, rows)
            for label, num, idx in ((PARTIAL, pn, pi), (FULL, fn, fi)):
                r, c = (rows == label).nonzero(as_tuple=True)
                if r.numel() == 0:
                    continue
                # nonzero lists cells row-major, so each row's columns come sorted
                per_row = num[mi, r0:r1].long()
                first = torch.cumsum(per_row, 0) - per_row
                idx[mi, r + r0, torch.arange(r.numel()) - first[r]] = c.to(torch.int32)
    return BlockTable(pn, pi, fn, fi, block_q, block_kv, nk)


def _fill_from_runs(
    st: _Settled, mi: int, pn: torch.Tensor, pi: torch.Tensor, fn: torch.Tensor, fi: torch.Tensor
) -> None:
    """Write program ``mi``'s sorted index lists from the sorted row runs, a bounded number of cells at once."""
    row, c0, c1, label = st.runs()
    for lab, num, idx in ((PARTIAL, pn, pi), (FULL, fn, fi)):
        sel = label == lab
        r, a, length = row[sel], c0[sel], (c1 - c0)[sel]
        if r.numel() == 0:
            continue
        ends = torch.cumsum(length, 0)
        per_row = num[mi].long()
        row_first = torch.cumsum(per_row, 0) - per_row
        # slot of each run's first cell within its row: runs are sorted, so cells before it in the row
        slot0 = ends - length - row_first[r]
        start = 0
        while start < r.numel():
            stop = int(torch.searchsorted(ends, int(ends[start] - length[start]) + _RASTER_CELLS, right=True))
            stop = max(stop, start + 1)
            n = length[start:stop]
            offset = torch.arange(int(n.sum())) - (torch.cumsum(n, 0) - n).repeat_interleave(n)
            rows = r[start:stop].repeat_interleave(n)
            idx[mi, rows, slot0[start:stop].repeat_interleave(n) + offset] = (
                a[start:stop].repeat_interleave(n) + offset
            ).to(torch.int32)
            start = stop


def _distance_pair_count(mask: Mask, q_len: int, kv_len: int, head: int, q_offset: int) -> int:
    """Allowed (q, kv) pairs of a predicate of d = q - kv alone: sum over d of allowed(d)
    times the number of pairs at distance d (O(q_len + kv_len))."""
    d = torch.arange(q_offset - (kv_len - 1), q_offset + q_len)
    allowed = mask.dense(torch.tensor([head]), d, torch.zeros(1, dtype=torch.int64), q_len, kv_len).reshape(-1)
    # q in [q_offset, q_offset + q_len), kv = q - d in [0, kv_len)
    lo = torch.clamp(d, min=q_offset)
    hi = torch.clamp(d + kv_len - 1, max=q_offset + q_len - 1)
    return int(((hi - lo + 1).clamp(min=0) * allowed).sum())


def count_allowed(
    mask: Mask,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    head: int = 0,
    q_order: torch.Tensor | None = None,
    kv_order: torch.Tensor | None = None,
    q_offset: int = 0,
) -> tuple[int, torch.Tensor]:
    """``(allowed (q, kv) pairs, counts[3] of EMPTY/PARTIAL/FULL blocks)``, exactly, without S x S:
    full blocks count their valid pairs, partial blocks are evaluated on their own tokens (a
    predicate of q - kv alone is counted per distance instead)."""
    st, qb, kb = _settle_mask(mask, q_len, kv_len, block_q, block_kv, head, q_order, kv_order, q_offset)
    q_valid = (qb.pos >= 0).sum(1)
    kv_valid = (kb.pos >= 0).sum(1)
    q_prefix = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(q_valid, 0)])
    kv_prefix = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(kv_valid, 0)])
    area = (st.rect_r1 - st.rect_r0) * (st.rect_c1 - st.rect_c0)
    full = int(area.sum())
    allowed = int(
        ((q_prefix[st.rect_r1] - q_prefix[st.rect_r0]) * (kv_prefix[st.rect_c1] - kv_prefix[st.rect_c0])).sum()
    )
    partial = 0
    by_distance = q_order is None and kv_order is None and mask.reads_distance_only
    if st.tiles.shape[0]:
        rows, cols, lab = st.tile_cells()
        rows, cols = rows.expand_as(lab), cols.expand_as(lab)
        is_full, is_partial = lab == FULL, lab == PARTIAL
        full += int(is_full.sum())
        partial += int(is_partial.sum())
        allowed += int((q_valid[rows[is_full]] * kv_valid[cols[is_full]]).sum())
        grid = mask.box_grid()
        if not by_distance and grid is not None:
            # partial pairs of blocks that fill their grid boxes may have a closed-form count
            pr, pc = rows[is_partial], cols[is_partial]
            boxes = qb.box(grid), kb.box(grid)
            in_box = _fills_box(boxes[0], q_valid)[pr] & _fills_box(boxes[1], kv_valid)[pc]
            counted = mask.count_box_pairs([t[pr[in_box]] for t in boxes[0]], [t[pc[in_box]] for t in boxes[1]])
            if counted is not None:
                allowed += counted
                rows, cols = pr[~in_box], pc[~in_box]
                is_partial = torch.ones_like(rows, dtype=torch.bool)
        if not by_distance:
            pr, pc = rows[is_partial], cols[is_partial]
            h = torch.tensor(head).view(1, 1, 1)
            step = max(1, _REFINE_ELEMS // (block_q * block_kv))
            for s in range(0, pr.numel(), step):
                qpos, kpos = qb.pos[pr[s : s + step]], kb.pos[pc[s : s + step]]
                valid = (qpos >= 0)[:, :, None] & (kpos >= 0)[:, None, :]
                allowed += int((mask.dense(h, qpos[:, :, None], kpos[:, None, :], q_len, kv_len) & valid).sum())
    if by_distance:
        allowed = _distance_pair_count(mask, q_len, kv_len, head, q_offset)
    counts = torch.tensor([st.nq * st.nk - partial - full, partial, full], dtype=torch.int64)
    return allowed, counts


def query_row_labels(
    mask: Mask, head: int, q_len: int, kv_len: int, q_offsets: list[int] | int, block_kv: int
) -> torch.Tensor:
    """``[len(q_offsets), ceil(kv_len / block_kv)]`` int8 EMPTY/PARTIAL/FULL labels of every kv
    block against all ``q_len`` queries of a call at once (row i: positions ``q_offsets[i] ..``),
    exactly: one row of bounds per call, O(kv blocks), partial blocks evaluated on their own
    tokens. What decode steps visit; several steps are labelled in one batch (a bare int gives
    one row)."""
    offsets = torch.tensor([q_offsets] if isinstance(q_offsets, int) else list(q_offsets), dtype=torch.int64)
    pos = offsets.view(-1, 1) + torch.arange(q_len)
    qb = Blocks(pos[:, 0].clone(), pos[:, -1].clone(), pos, q_len)
    kb = token_blocks(kv_len, block_kv)
    return torch.cat([labels for _, labels in classify_rows(mask, qb, kb, head, q_len, kv_len)])
