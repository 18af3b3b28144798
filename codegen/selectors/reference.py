"""Pure-torch reference of every step of block selection (each has a Triton twin in
:mod:`attncc.codegen.selectors.kernels`; both give identical tables from the same logits):

1. **features**: one row per ``pool`` tokens (:mod:`attncc.ir.scores`): the group mean, or the
   group's tokens laid end to end with query groups reversed (``antidiagonal``: ``qf . kf`` is the
   sum along the antidiagonal of the ``stride x stride`` score tile, scaled by ``1 / stride``);
2. **block logits**: ``logsumexp`` of ``scale * qf . kf`` over the feature rows of a (query
   block, kv block) pair, so ``softmax`` over kv blocks estimates each block's attention mass;
3. **selection** among the candidate blocks: ``topk`` keeps the ``k`` highest logits,
   ``threshold`` the fewest blocks whose softmax mass reaches ``tau`` (both keep at least
   ``min_blocks``); equal logits rank the lower block index first;
4. **block tables**: selected blocks are labelled by the program with the selector full, the
   others by the program with the selector empty; one table per (batch, head).

Plus the run-time key order of PBS-Attn (keys sorted by importance inside segments) and the
dense masks that are the references of a selection.
"""

from __future__ import annotations

import torch

from attncc.codegen.selectors.layout import DynamicLayout, layout, split_masks, to_kernel_blocks
from attncc.ir.blocks import BlockTable
from attncc.ir.plan import AttentionPlan
from attncc.ir.selection import SelectorConfig

Tensor = torch.Tensor


def features_reference(x: Tensor, cfg: SelectorConfig, query: bool) -> Tensor:
    """``[B, Hx, rows, F]`` fp32 feature rows of ``x [B, Hx, S, D]`` (see the module docstring)."""
    b, hx, s, d = x.shape
    g = cfg.pool
    rows = -(-s // g)
    xf = torch.zeros(b, hx, rows * g, d, dtype=torch.float32, device=x.device)
    xf[:, :, :s] = x.float()
    xf = xf.view(b, hx, rows, g, d)
    if cfg.score_kind.features == "antidiagonal":
        if query:
            xf = xf.flip(3)
        return xf.reshape(b, hx, rows, g * d)
    count = torch.clamp(s - torch.arange(rows, device=x.device) * g, max=g).to(torch.float32)
    return xf.sum(3) / count.view(1, 1, -1, 1)


def feature_scale(cfg: SelectorConfig, scale: float) -> float:
    return scale / cfg.pool if cfg.score_kind.features == "antidiagonal" else scale


def block_logits_reference(
    qf: Tensor, kf: Tensor, kv_head: Tensor, cand: Tensor, cfg: SelectorConfig, scale: float
) -> Tensor:
    """``[B, H, nI, nJ]`` fp32 block logits (``-inf`` off the candidates ``cand``: ``[nI, nJ]``
    or per row ``[B, H, nI, nJ]``)."""
    b, h, nr, _ = qf.shape
    nc = kf.shape[2]
    ni, nj = cand.shape[-2:]
    r = cfg.rows_per_block
    kf_h = kf[:, kv_head.long()]
    s = torch.matmul(qf, kf_h.transpose(-1, -2)) * feature_scale(cfg, scale)  # [B, H, nr, nc]
    full = torch.full((b, h, ni * r, nj * r), float("-inf"), device=qf.device)
    full[:, :, :nr, :nc] = s
    blocks = full.view(b, h, ni, r, nj, r).permute(0, 1, 2, 4, 3, 5).reshape(b, h, ni, nj, r * r)
    logits = torch.logsumexp(blocks, -1)
    return torch.where(cand.to(qf.device), logits, torch.tensor(float("-inf"), device=qf.device))


def select_reference(logits: Tensor, cand: Tensor, cfg: SelectorConfig) -> Tensor:
    """``[B, H, nI, nJ]`` bool: the selected candidate blocks (sort-based, float64 masses)."""
    cand = cand.to(logits.device).expand_as(logits)
    masked = torch.where(cand, logits.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    # stable descending sort: equal logits keep ascending block order
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    selected = cand & (rank < cfg.keep)
    if cfg.method == "threshold":
        row_max = masked.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.where(cand, torch.exp(masked - row_max), torch.zeros_like(masked))
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
        p_sorted = torch.gather(p, -1, order)
        before_sorted = torch.cumsum(p_sorted, -1) - p_sorted
        before = torch.empty_like(before_sorted).scatter_(-1, order, before_sorted)
        selected = selected | (cand & (before < cfg.tau))
    return selected


def tables_reference(selected: Tensor, lay: DynamicLayout) -> tuple[BlockTable, BlockTable]:
    """(selected-block table, other-block table), each with one row per (b, h): ``M = B * H``."""
    b, h, nq, nk = selected.shape
    prog = torch.tensor(lay.plan.head_to_program, device=selected.device)
    lab_sel = lay.labels_sel.to(selected.device)[prog].unsqueeze(0)
    lab_not = lay.labels_not.to(selected.device)[prog].unsqueeze(0)

    def compact(flag: Tensor) -> tuple[Tensor, Tensor]:
        count = flag.sum(-1).to(torch.int32)
        order = torch.sort((~flag).to(torch.int8), dim=-1, stable=True).indices
        keep = torch.arange(nk, device=flag.device) < count.unsqueeze(-1)
        return count.view(b * h, nq), torch.where(keep, order, 0).to(torch.int32).view(b * h, nq, nk)

    out = []
    for flag_on, labels in ((selected, lab_sel), (~selected, lab_not)):
        pn, pi = compact(flag_on & (labels == 1))
        fn, fi = compact(flag_on & (labels == 2))
        out.append(BlockTable(pn, pi, fn, fi, lay.plan.block_q, lay.plan.block_kv, nk))
    return out[0], out[1]


def key_order(q: Tensor, k: Tensor, segment: int) -> Tensor:
    """``[B, Hkv, Skv]`` int64, slot -> model key position: inside each run of ``segment``
    consecutive keys (the last may be shorter), keys by descending importance, equal importance
    in position order. Importance of key ``p`` of kv head ``j``: ``k[b, j, p] . qbar[b, j]`` in
    fp32, ``qbar`` the mean of ``q`` over all query positions and the query heads sharing kv head
    ``j``."""
    b, h, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    qbar = q.float().reshape(b, hkv, (h // hkv) * sq, d).mean(2)  # [B, Hkv, D]
    importance = torch.einsum("bjsd,bjd->bjs", k.float(), qbar)  # [B, Hkv, Skv]
    nseg = -(-skv // segment)
    padded = torch.full((b, hkv, nseg * segment), float("-inf"), device=k.device)
    padded[..., :skv] = importance
    # descending and stable: padding (-inf, the highest positions) sorts last in the last segment
    local = torch.sort(padded.view(b, hkv, nseg, segment), dim=-1, descending=True, stable=True).indices
    start = torch.arange(nseg, device=k.device).view(1, 1, nseg, 1) * segment
    return (local + start).view(b, hkv, nseg * segment)[..., :skv].contiguous()


def per_head_order(plan: AttentionPlan, order: Tensor, heads: list[int]) -> Tensor:
    """``order [B, Hkv, Skv]`` for query heads ``heads``: ``[B, len(heads), Skv]``."""
    kv_head = torch.tensor([hh // plan.gqa_group for hh in heads], device=order.device)
    return order.index_select(1, kv_head)


def gather_keys(x: Tensor, order_h: Tensor) -> Tensor:
    """``x [B, Hx, Skv, ...]`` with its key dim in slot order (``order_h [B, Hx, Skv]``)."""
    index = order_h.view(*order_h.shape, *([1] * (x.dim() - 3))).expand(*order_h.shape, *x.shape[3:])
    return x.gather(2, index)


def _block_any(m: Tensor, block: int) -> Tensor:
    """``[.., Sq, Skv]`` bool -> ``[.., nI, nJ]``: any pair inside each ``block x block`` tile."""
    sq, skv = m.shape[-2:]
    ni, nj = -(-sq // block), -(-skv // block)
    padded = m.new_zeros(*m.shape[:-2], ni * block, nj * block)
    padded[..., :sq, :skv] = m
    return padded.view(*m.shape[:-2], ni, block, nj, block).any(-1).any(-2)


def select_permuted(plan: AttentionPlan, q: Tensor, k: Tensor, order: Tensor) -> Tensor:
    """Selected kernel blocks ``[B, H, nq, nk]`` of the keys in slot order ``order [B, Hkv, Skv]``
    (torch reference): features, candidates and logits of the permuted keys. A candidate is a
    (query block, slot block) tile where the selection changes the mask for some pair."""
    lay = layout(plan)
    b, sq = q.shape[0], plan.q_len
    nq, nk = lay.num_q_blocks, lay.num_kv_blocks
    selected = torch.zeros(b, plan.num_heads, nq, nk, dtype=torch.bool, device=q.device)
    m_sel, m_not = split_masks(plan, q.device)
    for p, cfg in enumerate(lay.configs):
        if cfg is None:
            continue
        heads = lay.heads_of(p)
        order_h = per_head_order(plan, order, heads)  # [B, nh, Skv]
        diff = (m_sel[heads] ^ m_not[heads]).unsqueeze(0).expand(b, -1, -1, -1)
        diff_slots = diff.gather(-1, order_h.unsqueeze(2).expand(-1, -1, sq, -1))
        cand = _block_any(diff_slots, cfg.block)  # [B, nh, nI, nJ]
        kv_head = torch.tensor([hh // plan.gqa_group for hh in heads], device=q.device)
        qf = features_reference(q[:, heads], cfg, True)
        kf = features_reference(gather_keys(k, order), cfg, False)
        logits = block_logits_reference(qf, kf, kv_head, cand, cfg, plan.scale)
        selected[:, heads] = to_kernel_blocks(select_reference(logits, cand, cfg), cfg, plan, nq, nk)
    return selected


def slot_masks(plan: AttentionPlan, selected: Tensor, order: Tensor) -> Tensor:
    """``[B, H, Sq, Skv]`` bool in slot order: ``when_selected`` on selected slot blocks,
    ``when_not`` elsewhere, each evaluated at the model position the slot holds."""
    b, dev = selected.shape[0], selected.device
    m_sel, m_not = split_masks(plan, dev)
    index = per_head_order(plan, order, list(range(plan.num_heads))).unsqueeze(2)
    index = index.expand(-1, -1, plan.q_len, -1)
    m_sel = m_sel.unsqueeze(0).expand(b, -1, -1, -1).gather(-1, index)
    m_not = m_not.unsqueeze(0).expand(b, -1, -1, -1).gather(-1, index)
    rows = torch.arange(plan.q_len, device=dev) // plan.block_q
    cols = torch.arange(plan.kv_len, device=dev) // plan.block_kv
    tok = selected.index_select(-2, rows).index_select(-1, cols)
    return torch.where(tok, m_sel, m_not)


def dense_permuted_mask(plan: AttentionPlan, selected: Tensor, order: Tensor) -> Tensor:
    """``[B, H, Sq, Skv]`` bool in model order: the plan's mask under a selection made in slot
    order ``order`` (the reference of a run-time permutation)."""
    slots = slot_masks(plan, selected, order)
    index = per_head_order(plan, order, list(range(plan.num_heads))).unsqueeze(2).expand_as(slots)
    return torch.zeros_like(slots).scatter(-1, index, slots)


def vertical_slash_scores(
    q: Tensor, k: Tensor, kv_head: Tensor, cfg: SelectorConfig, scale: float, q_offset: int
) -> tuple[Tensor, Tensor]:
    """MInference's vertical-slash estimate, fp32: ``a = softmax(scale * q_last k^T)`` of the
    ``min(last_q, Sq)`` last queries (at positions ``q_offset + i``), each over the keys at or
    before it; ``vertical [B, H, Skv]`` sums ``a`` per key column, ``slash [B, H, P]`` per
    diagonal ``d = q - kv`` (``P`` = the last query position + 1)."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    last = min(cfg.last_q, sq)
    pos = q_offset + sq - last + torch.arange(last, device=q.device)  # [L]
    keys = torch.arange(skv, device=q.device)
    s = torch.matmul(q[:, :, sq - last :].float(), k[:, kv_head.long()].float().transpose(-1, -2)) * scale
    future = keys[None, :] > pos[:, None]  # [L, Skv]
    a = torch.softmax(s.masked_fill(future, float("-inf")), -1)  # [B, H, L, Skv]
    vertical = a.sum(-2)
    num_diagonals = q_offset + sq
    # future pairs have a == 0; clamped to diagonal 0 they add nothing
    diagonal = (pos[:, None] - keys[None, :]).clamp(min=0).expand(b, h, last, skv)
    slash = torch.zeros(b, h, num_diagonals, device=q.device).scatter_add_(
        -1, diagonal.reshape(b, h, -1), a.reshape(b, h, -1)
    )
    return vertical, slash


def keep_top(score: Tensor, n: int, forced: int) -> Tensor:
    """bool like ``score [.., S]``: the first ``forced`` indices and the highest-scoring others,
    ``max(n, forced)`` in all (equal scores: the lower index first)."""
    score = score.clone()
    score[..., :forced] = float("inf")
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < max(n, forced)


def vertical_slash_reference(
    q: Tensor, k: Tensor, kv_head: Tensor, cfg: SelectorConfig, scale: float, q_offset: int
) -> Tensor:
    """``[B, H, nI, nJ]`` bool, selector blocks: a block pair holds a kept key column (any of its
    rows) or a pair ``(q, kv)`` on a kept diagonal ``q - kv``; built from the dense token set."""
    sq, skv = q.shape[2], k.shape[2]
    vertical, slash = vertical_slash_scores(q, k, kv_head, cfg, scale, q_offset)
    columns = keep_top(vertical, cfg.vertical, cfg.keep_first)  # [B, H, Skv]
    diagonals = keep_top(slash, cfg.slash, cfg.keep_recent)  # [B, H, P]
    d = q_offset + torch.arange(sq, device=q.device)[:, None] - torch.arange(skv, device=q.device)[None, :]
    on_diagonal = diagonals[:, :, d.clamp(min=0)] & (d >= 0)  # [B, H, Sq, Skv]
    tokens = columns.unsqueeze(2) | on_diagonal
    return _block_any(tokens, cfg.block)
