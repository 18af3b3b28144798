"""Data-dependent block selection for plans whose mask programs contain a selector.

Pipeline per call (every step has a pure-torch reference here and a Triton kernel in
:mod:`attncc.codegen.selector_kernels`; both give identical tables from the same logits):

1. **features**: one row per ``pool`` tokens: the mean (``mean_pool``: ``pool = block``;
   ``draft``: ``pool`` tokens, a downsampled Q/K) or the tokens laid end to end, query groups
   reversed (``antidiagonal``: ``pool = stride``; ``qf . kf`` is the sum along the antidiagonal
   of the ``stride x stride`` score tile, scaled by ``1 / stride``);
2. **block logits**: ``logsumexp`` of ``scale * qf . kf`` over the feature rows of a (query
   block, kv block) pair, so ``softmax`` over kv blocks estimates each block's attention mass;
3. **selection** among the candidate blocks (where the selection changes the mask, see
   :mod:`attncc.selection`): ``topk`` keeps the ``k`` highest logits, ``threshold`` the fewest
   blocks whose softmax mass reaches ``tau`` (both keep at least ``min_blocks``); equal logits
   rank the lower block index first;
4. **block tables**: selected blocks are labelled by the program with the selector full,
   the others by the program with the selector empty; one table per (batch, head).

Execution: the plan's forward kernel runs twice per batch element over disjoint block sets
(``when_selected`` predicates on selected blocks, ``when_not`` on the others) and the two
partial results merge through their log-sum-exp. Executors ``torch`` and ``reference`` run
the exact dense attention under the mask :func:`dense_selected_mask` builds (no block skipping).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import torch

from attncc import masks as M
from attncc.blocks import EMPTY, BlockTable, classify
from attncc.plan import AttentionPlan
from attncc.selection import SelectorConfig, SelectorProgram, resolve_selector, split_program

Tensor = torch.Tensor


# -- per-plan static data ---------------------------------------------------------------------
@dataclass(frozen=True)
class DynamicLayout:
    """What a dynamic plan needs besides the data: per program its split, its selector config
    and static label maps (kernel blocks, ``[P, nq, nk]`` int8), and per selector program its
    candidates (selector blocks, ``[nI, nJ]`` bool)."""

    plan: AttentionPlan
    splits: tuple[SelectorProgram, ...]
    configs: tuple[SelectorConfig | None, ...]
    labels_sel: Tensor
    labels_not: Tensor
    candidates: tuple[Tensor | None, ...]
    plan_sel: AttentionPlan
    plan_not: AttentionPlan

    @property
    def num_q_blocks(self) -> int:
        return self.labels_sel.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.labels_sel.shape[2]

    def heads_of(self, program: int) -> list[int]:
        return [h for h, p in enumerate(self.plan.head_to_program) if p == program]


def is_dynamic(plan: AttentionPlan) -> bool:
    return any(p.is_dynamic for p in plan.programs)


def _xor(a: M.Mask, b: M.Mask) -> M.Mask:
    return M.Any_((M.All((a, M.Not(b))), M.All((b, M.Not(a)))))


def _per_head_plan(plan: AttentionPlan, programs: list[M.Mask]) -> AttentionPlan:
    """A static plan with one program per head (its own block-table row per head)."""
    per_head = tuple(programs[p] for p in plan.head_to_program)
    return dataclasses.replace(plan, programs=per_head, head_to_program=tuple(range(plan.num_heads)))


@functools.lru_cache(maxsize=64)
def layout(plan: AttentionPlan) -> DynamicLayout:
    """Static data of a dynamic plan, built once per plan."""
    if plan.permute is not None:
        raise ValueError("selectors run in model order; a plan with a permutation cannot carry one")
    heads = plan.program_heads()
    splits: list[SelectorProgram] = []
    configs: list[SelectorConfig | None] = []
    lab_sel: list[Tensor] = []
    lab_not: list[Tensor] = []
    cands: list[Tensor | None] = []
    for prog, head in zip(plan.programs, heads):
        split = split_program(prog)
        splits.append(split)
        args = (plan.q_len, plan.kv_len, plan.block_q, plan.block_kv, head)
        lab_sel.append(classify(split.when_selected, *args, q_offset=plan.q_offset))
        lab_not.append(classify(split.when_not, *args, q_offset=plan.q_offset))
        if split.selector is None:
            configs.append(None)
            cands.append(None)
            continue
        cfg = resolve_selector(split.selector, plan.block_q, plan.block_kv)
        configs.append(cfg)
        diff = _xor(split.when_selected, split.when_not)
        cand = classify(diff, plan.q_len, plan.kv_len, cfg.block, cfg.block, head, q_offset=plan.q_offset)
        cands.append(cand != EMPTY)
    return DynamicLayout(
        plan,
        tuple(splits),
        tuple(configs),
        torch.stack(lab_sel),
        torch.stack(lab_not),
        tuple(cands),
        _per_head_plan(plan, [s.when_selected for s in splits]),
        _per_head_plan(plan, [s.when_not for s in splits]),
    )


# -- pure-torch reference -----------------------------------------------------------------------
def features_reference(x: Tensor, cfg: SelectorConfig, query: bool) -> Tensor:
    """``[B, Hx, rows, F]`` fp32 feature rows of ``x [B, Hx, S, D]`` (see the module docstring)."""
    b, hx, s, d = x.shape
    g = cfg.pool
    rows = -(-s // g)
    xf = torch.zeros(b, hx, rows * g, d, dtype=torch.float32, device=x.device)
    xf[:, :, :s] = x.float()
    xf = xf.view(b, hx, rows, g, d)
    if cfg.score == "antidiagonal":
        if query:
            xf = xf.flip(3)
        return xf.reshape(b, hx, rows, g * d)
    count = torch.clamp(s - torch.arange(rows, device=x.device) * g, max=g).to(torch.float32)
    return xf.sum(3) / count.view(1, 1, -1, 1)


def _feature_scale(cfg: SelectorConfig, scale: float) -> float:
    return scale / cfg.pool if cfg.score == "antidiagonal" else scale


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
    s = torch.matmul(qf, kf_h.transpose(-1, -2)) * _feature_scale(cfg, scale)  # [B, H, nr, nc]
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


# -- Triton launchers -----------------------------------------------------------------------------
_MODULES: dict[str, ModuleType] = {}


def kernels(target: str) -> ModuleType:
    """:mod:`attncc.codegen.selector_kernels` imported for ``target`` (``interpret`` or ``cuda``)."""
    mod = _MODULES.get(target)
    if mod is None:
        from attncc.codegen.cache import load_module

        path = importlib.util.find_spec("attncc.codegen.selector_kernels").origin  # type: ignore[union-attr]
        mod = load_module(path, f"attncc_kernels.{target}.selector_kernels", target)  # type: ignore[arg-type]
        _MODULES[target] = mod
    return mod


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def features_triton(x: Tensor, cfg: SelectorConfig, query: bool, target: str) -> Tensor:
    b, hx, s, d = x.shape
    g = cfg.pool
    rows = -(-s // g)
    mean = cfg.score != "antidiagonal"
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
        GROUP_PAD=_pow2(g),
        BLOCK_D=_pow2(d, 16),
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
        _feature_scale(cfg, scale),
        ROWS=cfg.rows_per_block,
        ROWS_PAD=_pow2(cfg.rows_per_block, 16),
        FEAT=f,
        FEAT_PAD=_pow2(f, 16),
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
        NK_PAD=_pow2(nj, 16),
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
        NK_PAD=_pow2(nk, 16),
    )
    bq, bk = lay.plan.block_q, lay.plan.block_kv
    return (
        BlockTable(counts[0], idx[0], counts[1], idx[1], bq, bk, nk),
        BlockTable(counts[2], idx[2], counts[3], idx[3], bq, bk, nk),
    )


# -- selection -----------------------------------------------------------------------------------
def _to_kernel_blocks(sel: Tensor, cfg: SelectorConfig, plan: AttentionPlan, nq: int, nk: int) -> Tensor:
    """Selector-block selection ``[.., nI, nJ]`` -> kernel-block selection ``[.., nq, nk]``."""
    rows = torch.arange(nq, device=sel.device) * plan.block_q // cfg.block
    cols = torch.arange(nk, device=sel.device) * plan.block_kv // cfg.block
    return sel.index_select(-2, rows).index_select(-1, cols)


def select_blocks(plan: AttentionPlan, q: Tensor, k: Tensor, backend: str = "torch", with_logits: bool = False):
    """Selected kernel blocks ``[B, H, nq, nk]`` bool for ``q [B, H, Sq, D]``, ``k [B, Hkv, Skv, D]``
    (False for heads whose program has no selector). ``backend``: ``torch`` (reference),
    ``interpret`` or ``cuda`` (Triton kernels). With ``with_logits``, also returns a list of
    per-program ``(heads, logits)``."""
    lay = layout(plan)
    b = q.shape[0]
    nq, nk = lay.num_q_blocks, lay.num_kv_blocks
    selected = torch.zeros(b, plan.num_heads, nq, nk, dtype=torch.bool, device=q.device)
    all_logits = []
    for p, cfg in enumerate(lay.configs):
        if cfg is None:
            continue
        heads = lay.heads_of(p)
        cand = lay.candidates[p].to(q.device)  # type: ignore[union-attr]
        qh = q if heads == list(range(plan.num_heads)) else q[:, heads]
        kv_head = torch.tensor([hh // plan.gqa_group for hh in heads], device=q.device)
        if backend == "torch":
            qf, kf = features_reference(qh, cfg, True), features_reference(k, cfg, False)
            logits = block_logits_reference(qf, kf, kv_head, cand, cfg, plan.scale)
            sel = select_reference(logits, cand, cfg)
        else:
            qf, kf = features_triton(qh, cfg, True, backend), features_triton(k, cfg, False, backend)
            logits = block_logits_triton(qf, kf, kv_head, cand, cfg, plan.scale, backend)
            sel = select_triton(logits, cand, cfg, backend)
        selected[:, heads] = _to_kernel_blocks(sel, cfg, plan, nq, nk)
        all_logits.append((heads, logits))
    return (selected, all_logits) if with_logits else selected


def _split_masks(plan: AttentionPlan, dev) -> tuple[Tensor, Tensor]:
    """``[H, Sq, Skv]`` bool masks (model order) of ``when_selected`` and ``when_not`` per head."""
    lay = layout(plan)
    m_sel = torch.empty(plan.num_heads, plan.q_len, plan.kv_len, dtype=torch.bool, device=dev)
    m_not = torch.empty_like(m_sel)
    for p, split in enumerate(lay.splits):
        heads = lay.heads_of(p)
        args = (plan.q_len, plan.kv_len)
        m_sel[heads] = M.dense(split.when_selected, *args, heads=heads, q_offset=plan.q_offset, device=dev)
        m_not[heads] = M.dense(split.when_not, *args, heads=heads, q_offset=plan.q_offset, device=dev)
    return m_sel, m_not


def dense_selected_mask(plan: AttentionPlan, selected: Tensor) -> Tensor:
    """``[B, H, Sq, Skv]`` bool: the plan's mask under the selection ``selected [B, H, nq, nk]``
    (kernel blocks): ``when_selected`` on selected block pairs, ``when_not`` elsewhere."""
    dev = selected.device
    m_sel, m_not = _split_masks(plan, dev)
    rows = torch.arange(plan.q_len, device=dev) // plan.block_q
    cols = torch.arange(plan.kv_len, device=dev) // plan.block_kv
    tok = selected.index_select(-2, rows).index_select(-1, cols)
    return torch.where(tok, m_sel.unsqueeze(0), m_not.unsqueeze(0))


# -- execution -----------------------------------------------------------------------------------
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
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask_tensor: Tensor | None, selected: Tensor, executor: str
) -> tuple[Tensor, Tensor]:
    """Attention of a dynamic plan under a given selection ``[B, H, nq, nk]``."""
    if executor in ("torch", "reference"):
        return _attend_dense(plan, q, k, v, mask_tensor, dense_selected_mask(plan, selected))
    return _attend_kernels(layout(plan), q, k, v, mask_tensor, selected, executor)


def _attend_kernels(
    lay: DynamicLayout,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_tensor: Tensor | None,
    selected: Tensor,
    executor: str,
    order: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward kernels of ``lay`` twice per batch element (selected blocks, the others),
    merged through their log-sum-exp; ``order [B, Hkv, Skv]`` for a run-time key order."""
    from attncc.codegen.forward import attention_fwd

    target = "interpret" if executor == "interpret" else "cuda"
    table_sel, table_not = tables_triton(selected, lay, target)
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
    from attncc.codegen.reference import attention_reference

    if mask_tensor is not None:
        if mask_tensor.dtype == torch.bool:
            allowed = allowed & mask_tensor
        else:
            allowed = allowed & (mask_tensor > float("-inf"))
            return _reference_additive(plan, q, k, v, allowed, mask_tensor)
    full = dataclasses.replace(plan, programs=(M.Full(),), head_to_program=(0,) * plan.num_heads, mask_kind="bool")
    return attention_reference(full, q, k, v, allowed)


def _reference_additive(plan, q, k, v, allowed, mask_tensor):
    from attncc.codegen.reference import attention_reference

    full = dataclasses.replace(plan, programs=(M.Full(),), head_to_program=(0,) * plan.num_heads, mask_kind="additive")
    bias = torch.where(allowed, mask_tensor.to(torch.float32), torch.tensor(float("-inf")))
    return attention_reference(full, q, k, v, bias.to(q.dtype) if q.dtype != torch.float32 else bias)


def run_dynamic(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask_tensor: Tensor | None = None, executor: str = "torch"
) -> tuple[Tensor, Tensor]:
    """Estimate, select and attend: the forward of a plan with selectors (``executor`` resolved:
    ``triton``, ``interpret``, ``torch`` or ``reference``)."""
    selected = select_blocks(plan, q, k, _backend(executor))
    return attend(plan, q, k, v, mask_tensor, selected, executor)


def _backend(executor: str) -> str:
    """The estimator backend of a resolved executor."""
    return {"triton": "cuda", "interpret": "interpret"}.get(executor, "torch")


# -- reuse across layers and calls --------------------------------------------------------------
def selection_shape(plan: AttentionPlan, batch: int) -> tuple[int, int, int, int]:
    """Shape of a selection of ``plan``: ``[B, H, nq, nk]`` kernel blocks."""
    return (batch, plan.num_heads, -(-plan.q_len // plan.block_q), -(-plan.kv_len // plan.block_kv))


def run_select(
    plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, mask_tensor: Tensor | None, executor: str
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`run_dynamic` that also returns the selection it computed (a producing site)."""
    selected = select_blocks(plan, q, k, _backend(executor))
    out, lse = attend(plan, q, k, v, mask_tensor, selected, executor)
    return out, lse, selected


def run_reuse(
    plan: AttentionPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_tensor: Tensor | None,
    selected: Tensor,
    executor: str,
) -> tuple[Tensor, Tensor]:
    """Attention of a consuming site under a selection computed elsewhere (no estimation)."""
    want = selection_shape(plan, q.shape[0])
    if tuple(selected.shape) != want or selected.dtype != torch.bool:
        raise ValueError(
            f"rule '{plan.rule}' at {plan.name or '<top>'}: the reused selection is {selected.dtype} "
            f"{tuple(selected.shape)}, this site needs bool {want} ([B, H, query blocks, kv blocks])"
        )
    return attend(plan, q, k, v, mask_tensor, selected.to(q.device), executor)


def run_cached(
    plan: AttentionPlan,
    dense_plan: AttentionPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_tensor: Tensor | None,
    executor: str,
    state,
    dense_first: int,
    refresh_every: int,
) -> tuple[Tensor, Tensor]:
    """One call of a site with call reuse (``state``: its :class:`attncc.selection_cache.SiteState`,
    updated here): ``dense_plan`` (the model's mask) for the first ``dense_first`` calls, then the
    stored selection, recomputed every ``refresh_every`` calls (0: never) or when it does not fit."""
    call = state.calls
    state.calls += 1
    if call < dense_first:
        from attncc.codegen.executors import run

        return run(dense_plan, q, k, v, mask_tensor, executor)
    stored = state.selected
    fits = stored is not None and tuple(stored.shape) == selection_shape(plan, q.shape[0]) and stored.device == q.device
    due = (call - dense_first) % refresh_every == 0 if refresh_every else call == dense_first
    if due or not fits:
        state.selected = select_blocks(plan, q, k, _backend(executor))
        state.refreshes += 1
    return attend(plan, q, k, v, mask_tensor, state.selected, executor)


# -- run-time key permutation (PBS-Attn) ----------------------------------------------------------
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


def _per_head_order(plan: AttentionPlan, order: Tensor, heads: list[int]) -> Tensor:
    """``order [B, Hkv, Skv]`` for query heads ``heads``: ``[B, len(heads), Skv]``."""
    kv_head = torch.tensor([hh // plan.gqa_group for hh in heads], device=order.device)
    return order.index_select(1, kv_head)


def _gather_keys(x: Tensor, order_h: Tensor) -> Tensor:
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
    m_sel, m_not = _split_masks(plan, q.device)
    for p, cfg in enumerate(lay.configs):
        if cfg is None:
            continue
        heads = lay.heads_of(p)
        order_h = _per_head_order(plan, order, heads)  # [B, nh, Skv]
        diff = (m_sel[heads] ^ m_not[heads]).unsqueeze(0).expand(b, -1, -1, -1)
        diff_slots = diff.gather(-1, order_h.unsqueeze(2).expand(-1, -1, sq, -1))
        cand = _block_any(diff_slots, cfg.block)  # [B, nh, nI, nJ]
        kv_head = torch.tensor([hh // plan.gqa_group for hh in heads], device=q.device)
        qf = features_reference(q[:, heads], cfg, True)
        kf = features_reference(_gather_keys(k, order), cfg, False)
        logits = block_logits_reference(qf, kf, kv_head, cand, cfg, plan.scale)
        selected[:, heads] = _to_kernel_blocks(select_reference(logits, cand, cfg), cfg, plan, nq, nk)
    return selected


def _segment_labels(labels: Tensor, per: int) -> Tensor:
    """Block labels ``[P, nq, nk]`` (model order) -> labels valid for any key order that permutes
    keys only inside runs of ``per`` kv blocks: full where the whole run is full, empty where it
    is all empty, partial (predicate evaluated at model positions) otherwise."""
    p, nq, nk = labels.shape
    width = -(-nk // per) * per
    as_full = labels.new_full((p, nq, width), 2)
    as_empty = labels.new_zeros((p, nq, width))
    as_full[..., :nk] = labels
    as_empty[..., :nk] = labels
    all_full = (as_full.view(p, nq, -1, per) == 2).all(-1)
    all_empty = (as_empty.view(p, nq, -1, per) == 0).all(-1)
    runs = torch.where(all_full, 2, torch.where(all_empty, 0, 1)).to(labels.dtype)
    return runs.repeat_interleave(per, -1)[..., :nk].contiguous()


@functools.lru_cache(maxsize=64)
def permuted_layout(plan: AttentionPlan, segment: int) -> DynamicLayout:
    """:func:`layout` for keys in a run-time order sorted inside ``segment``-token runs: labels
    over slot blocks (each slot block holds keys of one segment) and forward plans that take
    the order as a kernel argument."""
    lay = layout(plan)
    if segment % plan.block_kv:
        raise ValueError(f"segment {segment} must be a multiple of the kernel kv block {plan.block_kv}")
    per = segment // plan.block_kv
    return dataclasses.replace(
        lay,
        labels_sel=_segment_labels(lay.labels_sel, per),
        labels_not=_segment_labels(lay.labels_not, per),
        plan_sel=dataclasses.replace(lay.plan_sel, runtime_key_order=True),
        plan_not=dataclasses.replace(lay.plan_not, runtime_key_order=True),
    )


def _slot_masks(plan: AttentionPlan, selected: Tensor, order: Tensor) -> Tensor:
    """``[B, H, Sq, Skv]`` bool in slot order: ``when_selected`` on selected slot blocks,
    ``when_not`` elsewhere, each evaluated at the model position the slot holds."""
    b, dev = selected.shape[0], selected.device
    m_sel, m_not = _split_masks(plan, dev)
    index = _per_head_order(plan, order, list(range(plan.num_heads))).unsqueeze(2)
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
    slots = _slot_masks(plan, selected, order)
    index = _per_head_order(plan, order, list(range(plan.num_heads))).unsqueeze(2).expand_as(slots)
    return torch.zeros_like(slots).scatter(-1, index, slots)


def run_permuted(
    plan: AttentionPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_tensor: Tensor | None,
    executor: str,
    segment: int,
) -> tuple[Tensor, Tensor]:
    """Forward of a plan whose keys are sorted by importance inside segments at run time: order,
    select in slot order (torch reference estimator, any device), then attend in slot order:
    ``torch``/``reference`` gather k/v (and the model's mask tensor) and run dense attention;
    ``triton``/``interpret`` run the forward kernels with the order as an argument (k/v are
    gathered inside the kernel, the mask tensor stays in model order). Queries keep model order,
    so outputs need no scatter."""
    order = key_order(q, k, segment)
    selected = select_permuted(plan, q, k, order)
    if executor not in ("torch", "reference"):
        return _attend_kernels(permuted_layout(plan, segment), q, k, v, mask_tensor, selected, executor, order)
    allowed = _slot_masks(plan, selected, order)
    ks, vs = _gather_keys(k, order), _gather_keys(v, order)
    if mask_tensor is not None:
        b, h = q.shape[0], plan.num_heads
        full = mask_tensor.expand(b, h, plan.q_len, plan.kv_len)
        index = _per_head_order(plan, order, list(range(h))).unsqueeze(2).expand(-1, -1, plan.q_len, -1)
        mask_tensor = full.gather(-1, index)
    return _attend_dense(plan, q, ks, vs, mask_tensor, allowed)
