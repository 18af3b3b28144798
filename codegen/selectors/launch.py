"""Launchers of the Triton selection kernels (:mod:`attncc.codegen.selectors.kernels`), on the
device and without a host synchronisation."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from attncc.codegen.cache import load_module
from attncc.codegen.common import next_pow2
from attncc.codegen.selectors.layout import DynamicLayout
from attncc.codegen.selectors.reference import feature_scale
from attncc.ir.blocks import BlockTable
from attncc.ir.selection import SelectorConfig

Tensor = torch.Tensor
_MODULES: dict[str, ModuleType] = {}


def kernels(target: str) -> ModuleType:
    """:mod:`attncc.codegen.selector_kernels` imported for ``target`` (``interpret`` or ``cuda``)."""
    mod = _MODULES.get(target)
    if mod is None:
        path = importlib.util.find_spec("attncc.codegen.selectors.kernels").origin  # type: ignore[union-attr]
        mod = load_module(path, f"attncc_kernels.{target}.selector_kernels", target)  # type: ignore[arg-type]
        _MODULES[target] = mod
    return mod


def features_triton(x: Tensor, cfg: SelectorConfig, query: bool, target: str) -> Tensor:
    b, hx, s, d = x.shape
    g = cfg.pool
    rows = -(-s // g)
    mean = cfg.score_kind.features == "mean"
    feat = torch.empty(b, hx, rows, d if mean else g * d, dtype=torch.float32, device=x.device)
    kernels(target).score_features_kernel[(rows, b * hx)](
        x,
        feat,
        *x.stride(),
        hx,
        s,
        rows,
        GROUP=g,
        HEAD_DIM=d,
        GROUP_PAD=next_pow2(g),
        BLOCK_D=next_pow2(d, 16),
        MEAN=mean,
        REVERSE=query and not mean,
    )
    return feat


def block_logits_triton(
    qf: Tensor, kf: Tensor, kv_head: Tensor, cand: Tensor, cfg: SelectorConfig, scale: float, target: str
) -> Tensor:
    b, h, nr, f = qf.shape
    ni, nj = cand.shape
    logits = torch.empty(b, h, ni, nj, dtype=torch.float32, device=qf.device)
    kernels(target).block_logits_kernel[(ni, b * h)](
        qf.contiguous(),
        kf.contiguous(),
        kv_head.to(torch.int32),
        cand.to(torch.int8).contiguous(),
        logits,
        h,
        kf.shape[1],
        nr,
        kf.shape[2],
        ni,
        nj,
        feature_scale(cfg, scale),
        ROWS=cfg.rows_per_block,
        ROWS_PAD=next_pow2(cfg.rows_per_block, 16),
        FEAT=f,
        FEAT_PAD=next_pow2(f, 16),
    )
    return logits


def select_triton(logits: Tensor, cand: Tensor, cfg: SelectorConfig, target: str) -> Tensor:
    b, h, ni, nj = logits.shape
    out = torch.empty(b, h, ni, nj, dtype=torch.int8, device=logits.device)
    kernels(target).select_blocks_kernel[(ni, b * h)](
        logits.contiguous(),
        cand.to(torch.int8).contiguous(),
        out,
        ni,
        nj,
        cfg.tau,
        KEEP=cfg.keep,
        TOPK=cfg.method == "topk",
        NK_PAD=next_pow2(nj, 16),
    )
    return out.bool()


def tables_triton(selected: Tensor, lay: DynamicLayout, target: str) -> tuple[BlockTable, BlockTable]:
    b, h, nq, nk = selected.shape
    dev = selected.device
    counts = [torch.zeros(b * h, nq, dtype=torch.int32, device=dev) for _ in range(4)]
    idx = [torch.zeros(b * h, nq, nk, dtype=torch.int32, device=dev) for _ in range(4)]
    h2p = torch.tensor(lay.plan.head_to_program, dtype=torch.int32, device=dev)
    kernels(target).block_tables_kernel[(nq, b * h)](
        selected.to(torch.int8).contiguous(),
        lay.labels_sel.to(dev).contiguous(),
        lay.labels_not.to(dev).contiguous(),
        h2p,
        counts[0],
        idx[0],
        counts[1],
        idx[1],
        counts[2],
        idx[2],
        counts[3],
        idx[3],
        h,
        nq,
        nk,
        NK_PAD=next_pow2(nk, 16),
    )
    bq, bk = lay.plan.block_q, lay.plan.block_kv
    return (
        BlockTable(counts[0], idx[0], counts[1], idx[1], bq, bk, nk),
        BlockTable(counts[2], idx[2], counts[3], idx[3], bq, bk, nk),
    )
