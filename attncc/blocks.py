"""Block classification and block tables: which (query block, kv block) pairs are empty,
partial (mask evaluated) or full (mask skipped), without ever building S x S."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attncc.masks import Blocks, Mask, broadcast_shape

EMPTY, PARTIAL, FULL = 0, 1, 2

#: token pairs evaluated at once when refining partial blocks exactly (bounds peak memory:
#: a few int64 temporaries of this many elements)
_REFINE_ELEMS = 1 << 20
#: block pairs bounded at once (rows of the block map per chunk = this // kv blocks)
_ROW_PAIRS = 1 << 20


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
    qb = token_blocks(q_len, block_q, q_order, q_offset)
    kb = token_blocks(kv_len, block_kv, kv_order)
    parts = [lab for _, lab in classify_rows(mask, qb, kb, head, q_len, kv_len)]
    return torch.cat(parts, 0)


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
    qb = token_blocks(q_len, block_q, q_order, q_offset)
    kb = token_blocks(kv_len, block_kv, kv_order)
    nq = qb.lo.shape[0]
    partial, full = [], []
    for mask, head in zip(masks, heads):
        p_rows, p_cols, f_rows, f_cols = [], [], [], []
        for r0, lab in classify_rows(mask, qb, kb, head, q_len, kv_len):
            pr, pc = (lab == PARTIAL).nonzero(as_tuple=True)
            fr, fc = (lab == FULL).nonzero(as_tuple=True)
            p_rows.append(pr + r0)
            p_cols.append(pc)
            f_rows.append(fr + r0)
            f_cols.append(fc)
        partial.append((torch.cat(p_rows), torch.cat(p_cols)))
        full.append((torch.cat(f_rows), torch.cat(f_cols)))
    pn, pi = _pack(partial, nq)
    fn, fi = _pack(full, nq)
    return BlockTable(pn, pi, fn, fi, block_q, block_kv, kb.lo.shape[0])


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
    full blocks count their valid pairs, partial blocks are evaluated on their own tokens."""
    qb = token_blocks(q_len, block_q, q_order, q_offset)
    kb = token_blocks(kv_len, block_kv, kv_order)
    q_valid = (qb.pos >= 0).sum(1)
    kv_valid = (kb.pos >= 0).sum(1)
    h = torch.tensor(head).view(1, 1, 1)
    allowed = 0
    counts = torch.zeros(3, dtype=torch.int64)
    for r0, lab in classify_rows(mask, qb, kb, head, q_len, kv_len):
        counts += torch.bincount(lab.flatten().long(), minlength=3)
        fr, fc = (lab == FULL).nonzero(as_tuple=True)
        allowed += int((q_valid[fr + r0] * kv_valid[fc]).sum())
        pr, pc = (lab == PARTIAL).nonzero(as_tuple=True)
        step = max(1, _REFINE_ELEMS // (block_q * block_kv))
        for s in range(0, pr.numel(), step):
            qpos, kpos = qb.pos[pr[s : s + step] + r0], kb.pos[pc[s : s + step]]
            valid = (qpos >= 0)[:, :, None] & (kpos >= 0)[:, None, :]
            allowed += int((mask.dense(h, qpos[:, :, None], kpos[:, None, :], q_len, kv_len) & valid).sum())
    return allowed, counts
