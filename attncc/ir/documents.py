"""Documents: several sequences packed into one row, each token seeing only its own document.

A plan with ``mask_kind == "documents"`` takes, instead of an S x S mask tensor, the document id
of every key position, ``ids [B, Skv]`` (any integers; equal ids = one document; query i sits
at key position ``q_offset + i``). Query i may attend key j only when
``ids[b, q_offset + i] == ids[b, j]`` -- on top of the plan's mask programs, so every static mask
composes with it (a window inside each document). Kernels skip the block pairs whose id ranges
do not meet, so the work is that of the documents, and the tables are built from the ids on the
device in O(blocks): never S x S.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.ir.masks.base import Blocks, Mask, on_grid, on_pairs


class DocumentError(ValueError):
    """Document ids that do not fit a call; the message says what was expected."""


def check_ids(ids: torch.Tensor, batch: int, kv_len: int, q_len: int, q_offset: int, device) -> None:
    """DocumentError unless ``ids`` is an integer ``[B or 1, Skv]`` tensor on ``device`` covering
    the queries' positions."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
        raise DocumentError(f"document ids must be an integer [B, Skv] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] not in (1, batch) or ids.shape[1] != kv_len:
        raise DocumentError(
            f"document ids have shape {tuple(ids.shape)}; expected [{batch}, {kv_len}] (or [1, {kv_len}])"
        )
    if ids.device != torch.device(device):
        raise DocumentError(f"document ids are on {ids.device}, the attention on {device}")
    if q_offset < 0 or q_offset + q_len > kv_len:
        raise DocumentError(
            f"queries at positions {q_offset}..{q_offset + q_len - 1} are not among the {kv_len} keys whose "
            "document ids are given (documents need self-attention over the packed row)"
        )


def same_document(ids: torch.Tensor, q_len: int, q_offset: int) -> torch.Tensor:
    """``[B, 1, Sq, Skv]`` bool: query i and key j in one document (the dense reference)."""
    q_ids = ids[:, q_offset : q_offset + q_len]
    return (q_ids[:, :, None] == ids[:, None, :]).unsqueeze(1)


def block_ranges(ids_row: torch.Tensor, start: int, length: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min id, max id) of each ``block``-token block of ``ids_row[start : start + length]``."""
    part = ids_row[start : start + length].to(torch.int64)
    n = -(-length // block)
    pad = n * block - length
    lo = torch.nn.functional.pad(part, (0, pad), value=torch.iinfo(torch.int64).max).view(n, block).amin(1)
    hi = torch.nn.functional.pad(part, (0, pad), value=torch.iinfo(torch.int64).min).view(n, block).amax(1)
    return lo, hi


def block_overlap(
    ids_row: torch.Tensor, q_len: int, q_offset: int, kv_len: int, block_q: int, block_kv: int
) -> torch.Tensor:
    """``[nq, nk]`` bool: query block i and kv block j may share a document (their id ranges
    meet). Conservative: a pair that shares an id always meets, so no needed block is skipped."""
    qlo, qhi = block_ranges(ids_row, q_offset, q_len, block_q)
    klo, khi = block_ranges(ids_row, 0, kv_len, block_kv)
    return (qlo[:, None] <= khi[None, :]) & (klo[None, :] <= qhi[:, None])


def documents_of_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids of packed rows from their position ids ``[B, S]``: a new document wherever a
    position is not the one before plus 1 (the rule of Hugging Face's
    ``find_packed_sequence_indices``, for the flattening collator's ``position_ids``)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def document_density(ids: torch.Tensor, allowed_static: torch.Tensor | None = None) -> float:
    """Fraction of (query, key) pairs of a self-attention over ``ids [B, S]`` in one document
    (times the static mask ``[Sq, Skv]`` when given): dense, for reports."""
    same = same_document(ids, ids.shape[1], 0)[:, 0]
    if allowed_static is not None:
        same = same & allowed_static
    return float(same.double().mean())


@dataclass(frozen=True, eq=False)
class SameDocument(Mask):
    """Query and key in one document of ``ids`` (``[Skv]``, one batch element): a mask node
    built at run time (never written in a spec) so the CPU path classifies blocks of packed
    rows like any static mask. Equal (and hashed) by the ids' content."""

    ids: torch.Tensor
    digest: str = ""
    #: non-decreasing ids (set from ``ids``)
    _sorted: bool = False
    kind: ClassVar[str] = "documents"

    def __post_init__(self):
        ids = self.ids.detach().to("cpu", torch.int64).contiguous()
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "digest", hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16])
        # non-decreasing ids (packed rows): a block's ids run from its first to its last position's
        object.__setattr__(self, "_sorted", bool((ids[1:] >= ids[:-1]).all()) if ids.numel() > 1 else True)

    def __eq__(self, other):
        return isinstance(other, SameDocument) and other.digest == self.digest

    def __hash__(self):
        return hash(("documents", self.digest))

    def _at(self, pos: torch.Tensor) -> torch.Tensor:
        return self.ids.to(pos.device)[pos.clamp(0, self.ids.numel() - 1)]

    def dense(self, h, q, kv, q_len, kv_len):
        return on_grid(h, q, kv, self._at(q) == self._at(kv))

    def bounds(self, qb: Blocks, kb: Blocks, h: int):
        if not self._sorted:
            return on_pairs(qb, kb, True), on_pairs(qb, kb, False)
        qlo, qhi, klo, khi = (self._at(x) for x in (qb.lo, qb.hi, kb.lo, kb.hi))
        may = (qlo <= khi) & (klo <= qhi)
        must = (qlo == qhi) & (klo == khi) & (qlo == klo)
        return on_pairs(qb, kb, may), on_pairs(qb, kb, must)

    def triton(self) -> str:
        raise NotImplementedError("documents reach the Triton kernels as ids (mask_kind 'documents'), not a predicate")

    def to_spec(self):
        return f"documents#{self.digest}"
