"""The vertical-slash selection of a run: MInference's estimate from the last queries, and the
selected (query block, kv block) pairs without building the token set, as torch ops on the
inputs' device (O(last_q * S) for the estimate, O(blocks) for the pairs; no host
synchronisation). :func:`attncc.codegen.selectors.reference.vertical_slash_reference` builds
the same pairs from the dense token set."""

from __future__ import annotations

import torch

from attncc.codegen.selectors.reference import keep_top, vertical_slash_scores
from attncc.ir.selection import SelectorConfig

Tensor = torch.Tensor


def vertical_slash_blocks(
    q: Tensor, k: Tensor, kv_head: Tensor, cfg: SelectorConfig, scale: float, q_offset: int
) -> Tensor:
    """``[B, H, nI, nJ]`` bool, selector blocks: kv block ``J`` holds a kept column, or the
    diagonals ``q - kv`` that block pair ``(I, J)`` crosses (one run of consecutive offsets)
    include a kept one, counted by a prefix sum over the kept diagonals."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    blk = cfg.block
    ni, nj = -(-sq // blk), -(-skv // blk)
    vertical, slash = vertical_slash_scores(q, k, kv_head, cfg, scale, q_offset)
    columns = keep_top(vertical, cfg.vertical, cfg.keep_first)  # [B, H, Skv]
    diagonals = keep_top(slash, cfg.slash, cfg.keep_recent)  # [B, H, P]
    padded = columns.new_zeros(b, h, nj * blk)
    padded[..., :skv] = columns
    column_blocks = padded.view(b, h, nj, blk).any(-1)  # [B, H, nJ]
    count = torch.zeros(b, h, diagonals.shape[-1] + 1, dtype=torch.int32, device=q.device)
    count[..., 1:] = torch.cumsum(diagonals.to(torch.int32), -1)  # count[d]: kept diagonals below d
    i = torch.arange(ni, device=q.device)
    j = torch.arange(nj, device=q.device)
    q_first = q_offset + i * blk
    q_last = q_offset + torch.clamp((i + 1) * blk, max=sq) - 1
    k_first = j * blk
    k_last = torch.clamp((j + 1) * blk, max=skv) - 1
    num = diagonals.shape[-1]
    lo = (q_first[:, None] - k_last[None, :]).clamp(0, num)  # [nI, nJ]
    hi = (q_last[:, None] - k_first[None, :] + 1).clamp(0, num)
    c = count.unsqueeze(2).expand(b, h, ni, -1)
    crossed = torch.gather(c, -1, hi.expand(b, h, -1, -1)) - torch.gather(c, -1, lo.expand(b, h, -1, -1))
    return column_blocks.unsqueeze(2) | (crossed > 0)
