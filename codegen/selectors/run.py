"""Attention of plans with data-dependent selectors: estimate and select the blocks, then attend.

A target (``cuda`` or ``interpret``) runs the Triton estimator and the plan's forward kernel twice
per batch element over disjoint block sets (``when_selected`` predicates on selected blocks,
``when_not`` on the others), merged through their log-sum-exp. Without a target (the ``torch``
and ``reference`` executors) the torch reference selects and the exact dense attention runs
under the mask :func:`~attncc.codegen.selectors.layout.dense_selected_mask` builds (no block
skipping).
"""

from __future__ import annotations

import dataclasses

import torch

from attncc.codegen.forward.launch import attention_fwd
from attncc.codegen.forward.reference import attention_reference
from attncc.codegen.selectors import launch as L
from attncc.codegen.selectors import reference as R
from attncc.codegen.selectors.layout import (
    DynamicLayout,
    dense_selected_mask,
    layout,
    permuted_layout,
    selection_shape,
    to_kernel_blocks,
)
from attncc.codegen.selectors.vertical_slash import vertical_slash_blocks
from attncc.ir import masks as M
from attncc.ir.blocks import BlockTable
from attncc.ir.plan import AttentionPlan

Tensor = torch.Tensor


def select_blocks(plan: AttentionPlan, q: Tensor, k: Tensor, target: str | None = None, with_logits: bool = False):
    """Selected kernel blocks ``[B, H, nq, nk]`` bool for ``q [B, H, Sq, D]``, ``k [B, Hkv, Skv, D]``
    (False for heads whose program has no selector), by the torch reference (``target`` None) or
    the Triton kernels on ``target`` (``interpret`` or ``cuda``); a ``vertical_slash`` selector
    estimates with torch ops on the inputs' device either way. With ``with_logits``, also
    returns a list of per-program ``(heads, logits)`` (block-scoring selectors only)."""
    lay = layout(plan)
    b = q.shape[0]
    nq, nk = lay.num_q_blocks, lay.num_kv_blocks
    selected = torch.zeros(b, plan.num_heads, nq, nk, dtype=torch.bool, device=q.device)
    all_logits = []
    for p, cfg in enumerate(lay.configs):
        cand = lay.candidates[p]
        if cfg is None or cand is None:
            continue
        heads = lay.heads_of(p)
        cand = cand.to(q.device)
        qh = q if heads == list(range(plan.num_heads)) else q[:, heads]
        kv_head = torch.tensor([hh // plan.gqa_group for hh in heads], device=q.device)
        if cfg.method == "vertical_slash":
            # the same torch estimate on every executor; on a target the tables and attention run in Triton
            sel = vertical_slash_blocks(qh, k, kv_head, cfg, plan.scale, plan.q_offset) & cand
            selected[:, heads] = to_kernel_blocks(sel, cfg, plan, nq, nk)
            continue
        if target is None:
            qf, kf = R.features_reference(qh, cfg, True), R.features_reference(k, cfg, False)
            logits = R.block_logits_reference(qf, kf, kv_head, cand, cfg, plan.scale)
            sel = R.select_reference(logits, cand, cfg)
        else:
            qf, kf = L.features_triton(qh, cfg, True, target), L.features_triton(k, cfg, False, target)
            logits = L.block_logits_triton(qf, kf, kv_head, cand, cfg, plan.scale, target)
            sel = L.select_triton(logits, cand, cfg, target)
        selected[:, heads] = to_kernel_blocks(sel, cfg, plan, nq, nk)
        all_logits.append((heads, logits))
    return (selected, all_logits) if with_logits else selected


def _merge(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of attention over two disjoint key sets through their log-sum-exp."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(l1 - safe).unsqueeze(-1)
    w2 = torch.exp(l2 - safe).unsqueeze(-1)
    out = o1.float() * w1 + o2.float() * w2
    return out.to(o1.dtype), lse


def _batch_table(table: BlockTable, b: int, h: int) -> BlockTable:
    rows = slice(b * h, (b + 1) * h)
    return BlockTable(
        table.kv_num_blocks[rows],
        table.kv_indices[rows],
        table.full_num_blocks[rows],
        table.full_indices[rows],
        table.block_q,
        table.block_kv,
        table.num_kv_blocks,
    )


def attend(
    plan: AttentionPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_tensor: Tensor | None,
    selected: Tensor,
    target: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a dynamic plan under a selection ``[B, H, nq, nk]`` bool (kernel blocks), computed
    here or elsewhere (reused across layers or calls): the forward kernels on ``target``, or the
    exact dense attention without one."""
    want = selection_shape(plan, q.shape[0])
    if tuple(selected.shape) != want or selected.dtype != torch.bool:
        raise ValueError(
            f"rule '{plan.rule}' at {plan.name or '<top>'}: the selection is {selected.dtype} "
            f"{tuple(selected.shape)}, this site needs bool {want} ([B, H, query blocks, kv blocks])"
        )
    selected = selected.to(q.device)
    if target is None:
        return _attend_dense(plan, q, k, v, mask_tensor, dense_selected_mask(plan, selected))
    return _attend_kernels(layout(plan), q, k, v, mask_tensor, selected, target)


def _attend_kernels(
    lay: DynamicLayout,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_tensor: Tensor | None,
    selected: Tensor,
    target: str,
    order: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward kernels of ``lay`` twice per batch element (selected blocks, the others),
    merged through their log-sum-exp; ``order [B, Hkv, Skv]`` for a run-time key order."""
    table_sel, table_not = L.tables_triton(selected, lay, target)
    h = lay.plan.num_heads
    outs, lses = [], []
    for b in range(q.shape[0]):
        mt = None if mask_tensor is None else mask_tensor[b : b + 1] if mask_tensor.shape[0] > 1 else mask_tensor
        qb, kb, vb = q[b : b + 1], k[b : b + 1], v[b : b + 1]
        ob = None if order is None else order[b : b + 1]
        o1, l1 = attention_fwd(
            lay.plan_sel, qb, kb, vb, mt, target=target, block_table=_batch_table(table_sel, b, h), kv_order=ob
        )
        o2, l2 = attention_fwd(
            lay.plan_not, qb, kb, vb, mt, target=target, block_table=_batch_table(table_not, b, h), kv_order=ob
        )
        o, lse = _merge(o1, l1, o2, l2)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _attend_dense(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask_tensor: Tensor | None, allowed: Tensor
) -> tuple[Tensor, Tensor]:
    """Exact attention where ``allowed [B, H, Sq, Skv]`` and the model's mask tensor allow."""
    if mask_tensor is not None:
        if mask_tensor.dtype == torch.bool:
            allowed = allowed & mask_tensor
        else:
            allowed = allowed & (mask_tensor > float("-inf"))
            return _reference_additive(plan, q, k, v, allowed, mask_tensor)
    full = dataclasses.replace(plan, programs=(M.Full(),), head_to_program=(0,) * plan.num_heads, mask_kind="bool")
    return attention_reference(full, q, k, v, allowed)


def _reference_additive(plan, q, k, v, allowed, mask_tensor):
    full = dataclasses.replace(plan, programs=(M.Full(),), head_to_program=(0,) * plan.num_heads, mask_kind="additive")
    bias = torch.where(allowed, mask_tensor.to(torch.float32), torch.tensor(float("-inf")))
    return attention_reference(full, q, k, v, bias.to(q.dtype) if q.dtype != torch.float32 else bias)


def run_permuted(
    plan: AttentionPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_tensor: Tensor | None,
    segment: int,
    target: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward of a plan whose keys are sorted by importance inside segments at run time: order,
    select in slot order (torch reference estimator, any device), then attend in slot order:
    without a target, gather k/v (and the model's mask tensor) and run dense attention; on a
    target, run the forward kernels with the order as an argument (k/v are gathered inside the
    kernel, the mask tensor stays in model order). Queries keep model order, so outputs need no
    scatter."""
    if plan.score_mod is not None and plan.score_mod.alibi is not None:
        raise ValueError(
            f"rule '{plan.rule}': keys ordered at run time cannot take an ALiBi bias (it reads key "
            "positions); use a static mask or no permutation for this model"
        )
    order = R.key_order(q, k, segment)
    selected = R.select_permuted(plan, q, k, order)
    if target is not None:
        return _attend_kernels(permuted_layout(plan, segment), q, k, v, mask_tensor, selected, target, order)
    allowed = R.slot_masks(plan, selected, order)
    ks, vs = R.gather_keys(k, order), R.gather_keys(v, order)
    if mask_tensor is not None:
        b, h = q.shape[0], plan.num_heads
        full = mask_tensor.expand(b, h, plan.q_len, plan.kv_len)
        index = R.per_head_order(plan, order, list(range(h))).unsqueeze(2).expand(-1, -1, plan.q_len, -1)
        mask_tensor = full.gather(-1, index)
    return _attend_dense(plan, q, ks, vs, mask_tensor, allowed)
