"""Block tables of packed documents, per batch element, built on the device from the ids.

A plan's static table (its mask programs) is filtered row by row: a kv block stays in a query
block's row only where their document id ranges meet (:func:`attncc.ir.documents.block_overlap`).
That is O(table entries) of device work per batch element, never S x S; the kernels then check
the ids pair by pair inside the blocks that remain.
"""

from __future__ import annotations

import torch

from attncc.ir.blocks import BlockTable
from attncc.ir.documents import block_overlap


def filter_table(table: BlockTable, keep: torch.Tensor) -> BlockTable:
    """``table`` with each row's kv blocks ``j`` kept only where ``keep[row, j]`` ([rows, cols]
    bool), partial and full lists alike (order within a row preserved)."""

    def one(counts: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, rows, width = idx.shape
        slot = torch.arange(width, device=idx.device).view(1, 1, -1)
        valid = slot < counts.unsqueeze(-1).long()
        hit = keep.unsqueeze(0).expand(m, rows, keep.shape[1]).gather(2, idx.long().clamp(min=0))
        kept = valid & hit
        # stable sort puts the kept entries first, in their order
        order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices
        return kept.sum(-1).to(torch.int32), idx.gather(-1, order).contiguous()

    pn, pi = one(table.kv_num_blocks, table.kv_indices)
    fn, fi = one(table.full_num_blocks, table.full_indices)
    return BlockTable(pn, pi, fn, fi, table.block_q, table.block_kv, table.num_kv_blocks)


def document_table(
    table: BlockTable, ids_row: torch.Tensor, q_len: int, q_offset: int, kv_len: int, transposed: bool = False
) -> BlockTable:
    """The plan's ``table`` (rows: query blocks; ``transposed``: rows are kv blocks, as the dK/dV
    kernel walks them) restricted to block pairs that may share a document of ``ids_row [Skv]``."""
    if transposed:
        overlap = block_overlap(ids_row, q_len, q_offset, kv_len, table.block_kv, table.block_q).T
    else:
        overlap = block_overlap(ids_row, q_len, q_offset, kv_len, table.block_q, table.block_kv)
    return filter_table(table, overlap.contiguous())


def document_argument(ids: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Document ids ``[B, Skv]`` as the kernels read them: int64 (never narrowed: ids that differ
    only above 32 bits stay different), the batch stride, then the same position stride for
    queries (read at their positions) and keys."""
    t = ids.to(torch.int64).contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0, 0, t.stride(1), t.stride(1))
