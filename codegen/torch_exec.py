"""Fast CPU executor: a plan's block table lowered to a few batched calls of the fused CPU attention kernel.

How a plan runs (all layout work is prepared once per plan and cached):

* every head whose mask is the same program forms a *unit*; under GQA a unit's query
  heads are grouped onto their kv head (the group's rows share one K/V, never copied per head);
* per query block, the visited kv blocks (partial and full) are cut into *segments*:
  contiguous runs in kernel order; a run is split where it holds a long stretch of full
  blocks, so the mask bias only ever covers partial blocks (plus short full gaps);
* a partial segment is trimmed to the kv tokens that are allowed for some query of the
  block, and carries a small ``0 / -inf`` bias tile; full segments carry none;
* segments with the same length whose query blocks and kv starts advance in lock step
  become one *group*: one call of ``aten._scaled_dot_product_flash_attention_for_cpu``
  on strided views (``unfold`` windows or ``expand``, no copy) of K and V; irregular
  segments are gathered;
* a query block visited by several groups merges their partial results through the
  log-sum-exp the kernel returns.

A program that is exactly ``causal`` in model order with no query offset is lowered to the
kernel's own causal mode. Gradients come from :func:`attention_torch_backward`, which walks
the same groups with the kernel's backward and the final ``(out, lse)``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch

from attncc.codegen.common import unit_stride_rows
from attncc.ir import masks as M
from attncc.ir.blocks import build_block_table
from attncc.ir.plan import AttentionPlan

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: full runs up to this many blocks stay inside a partial segment (a bias is cheaper than a merge)
MERGE_FULL_BLOCKS = 16
#: a class of equal-length segments that falls into more chains than this is gathered in one call
MAX_CHAINS = 4
#: a query block whose kv blocks form this many contiguous runs or more is gathered into one call
GATHER_MIN_RUNS = 3
#: gathered calls pad their kv length up to a multiple of this (fewer, larger calls)
GATHER_PAD = 32
#: K and V gathered for one call stay under this many bytes (larger groups run in row pieces)
GATHER_BYTES = 256 << 20
_NEG = float("-inf")


@dataclass
class _Group:
    """One kernel call: ``n`` query blocks, each against ``length`` kv tokens (kernel order)."""

    rows: torch.Tensor  # [n] query block indices
    row_slice: slice | None  # the same rows as a slice when they are evenly spaced
    length: int
    kv_start: int
    kv_step: int | None  # kv start of row i is kv_start + i * kv_step; None: use kv_index
    kv_index: torch.Tensor  # [n, length] kv slots (always kept: masks and backward use it)
    bias: torch.Tensor | None  # [1, n, g*bq, length] float32 (0 / -inf), structural mask
    dead: torch.Tensor | None  # [n, g*bq] rows with no allowed key in this group
    first: bool  # no row of this group was written by an earlier group
    causal: bool = False  # the kernel's own causal mode over the whole sequence
    gathered: bool = False  # each row's whole kv set (several runs) gathered into this one call
    fresh: torch.Tensor | None = None  # rows of a merging group that no earlier group wrote


@dataclass
class _Unit:
    """Query heads ``q_heads[j, :]`` share kv head ``kv_heads[j]`` and one mask program."""

    q_heads: torch.Tensor  # [n_kv, g]
    kv_heads: torch.Tensor  # [n_kv]
    groups: list[_Group]
    uncovered: torch.Tensor | None = None  # query blocks no group visits: zero output, lse -inf


@dataclass
class _Prepared:
    units: list[_Unit]
    q_order: torch.Tensor | None
    q_inverse: torch.Tensor | None
    kv_order: torch.Tensor | None
    num_q_blocks: int
    block_q: int


_CACHE: OrderedDict[tuple, _Prepared] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 32


def prepare(plan: AttentionPlan, device: torch.device | str = "cpu", with_mask_tensor: bool = False) -> _Prepared:
    """Per-plan preprocessing (segments, groups, bias tiles), cached by plan, device and
    whether a runtime mask tensor is present."""
    key = (plan, str(torch.device(device)), with_mask_tensor)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    prepared = _prepare(plan, torch.device(device), with_mask_tensor)
    with _CACHE_LOCK:
        _CACHE[key] = prepared
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return prepared


def _units_of(plan: AttentionPlan) -> list[tuple[M.Mask, int, list[list[int]], list[int]]]:
    """(mask, representative head, q heads per kv head, kv heads): head-dependent programs get
    one unit per head; GQA groups of unequal size are split so every unit is rectangular."""
    g = plan.gqa_group
    out = []
    for p, mask in enumerate(plan.programs):
        heads = [h for h, j in enumerate(plan.head_to_program) if j == p]
        if not heads:
            continue
        head_sets = [[h] for h in heads] if mask.depends_on_head else [heads]
        for hs in head_sets:
            by_kv: dict[int, list[int]] = {}
            for h in hs:
                by_kv.setdefault(h // g, []).append(h)
            by_size: dict[int, list[int]] = {}
            for kvh, qs in by_kv.items():
                by_size.setdefault(len(qs), []).append(kvh)
            for _, kvs in sorted(by_size.items()):
                out.append((mask, hs[0], [by_kv[k] for k in kvs], kvs))
    return out


def _is_plain_causal(plan: AttentionPlan, mask: M.Mask, with_mask_tensor: bool) -> bool:
    # top-left causal of the kernel equals kv <= q only with no offset and model order
    return isinstance(mask, M.Causal) and plan.permute is None and plan.q_offset == 0 and not with_mask_tensor


def _prepare(plan: AttentionPlan, device: torch.device, with_mask_tensor: bool) -> _Prepared:
    for p in plan.programs:
        if p.is_dynamic:
            raise ValueError(
                f"executor 'torch': mask {p} selects blocks at run time; only static masks have a block table"
            )
    bq, bk = plan.block_q, plan.block_kv
    nqb = -(-plan.q_len // bq)
    order = plan.order()
    q_pos = torch.full((nqb * bq,), -1, dtype=torch.int64)
    q_pos[: plan.q_len] = (torch.arange(plan.q_len) if order is None else order) + plan.q_offset
    kv_pos = torch.arange(plan.kv_len) if order is None else order
    units = []
    for mask, head, q_heads, kv_heads in _units_of(plan):
        g = len(q_heads[0])
        if _is_plain_causal(plan, mask, with_mask_tensor):
            groups = [
                _Group(
                    torch.arange(nqb),
                    slice(0, nqb),
                    plan.kv_len,
                    0,
                    0,
                    torch.arange(plan.kv_len).view(1, -1),
                    None,
                    None,
                    True,
                    causal=True,
                )
            ]
        else:
            table = build_block_table([mask], [head], plan.q_len, plan.kv_len, bq, bk, order, order, plan.q_offset)
            segments = _segments(plan, mask, head, table, q_pos, kv_pos)
            groups = _group(segments, nqb, g, bq)
        covered = np.zeros(nqb, bool)
        for grp in groups:
            covered[grp.rows.numpy()] = True
        uncovered = torch.from_numpy(np.nonzero(~covered)[0]) if not covered.all() else None
        units.append(_Unit(torch.tensor(q_heads), torch.tensor(kv_heads), groups, uncovered))
    inverse = plan.permute.inverse() if plan.permute is not None else None
    return _Prepared(units, order, inverse, order, nqb, bq)


def _partial_tiles(plan, mask, head, rows, cols, q_pos, kv_pos) -> np.ndarray:
    """Exact ``[n, bq, bk]`` allowed tiles of the partial blocks ``(rows[i], cols[i])``, evaluated
    in a few vectorised calls (padding past either length is not allowed)."""
    bq, bk = plan.block_q, plan.block_kv
    nkb = -(-plan.kv_len // bk)
    kv_pad = torch.full((nkb * bk,), -1, dtype=torch.int64)
    kv_pad[: plan.kv_len] = kv_pos
    q_blocks, kv_blocks = q_pos.view(-1, bq), kv_pad.view(-1, bk)
    out = np.zeros((len(rows), bq, bk), dtype=bool)
    step = max(1, (1 << 22) // (bq * bk))
    h = torch.tensor(head).view(1, 1, 1)
    for s in range(0, len(rows), step):
        qp = q_blocks[torch.from_numpy(rows[s : s + step])][:, :, None]
        kp = kv_blocks[torch.from_numpy(cols[s : s + step])][:, None, :]
        allowed = mask.dense(h, qp.clamp(min=0), kp.clamp(min=0), plan.q_len, plan.kv_len)
        out[s : s + step] = (allowed & (qp >= 0) & (kp >= 0)).numpy()
    return out


def _segments(plan, mask, head, table, q_pos, kv_pos) -> list[tuple[int, np.ndarray, torch.Tensor | None, bool]]:
    """``(row, kv slots, allowed tile [bq, len] or None, gathered)`` per segment, kernel order.

    A query block whose visited kv blocks form few contiguous runs gets one segment per run
    (kv slots contiguous, run as strided views); one with :data:`GATHER_MIN_RUNS` or more runs
    gets a single *gathered* segment holding exactly the kv tokens some query of the block may
    see, so it needs one kernel call and no merges."""
    bq, bk, kv_len = plan.block_q, plan.block_kv, plan.kv_len
    pn, pi = table.kv_num_blocks[0].numpy(), table.kv_indices[0].numpy()
    fn, fi = table.full_num_blocks[0].numpy(), table.full_indices[0].numpy()
    p_rows = np.repeat(np.arange(pn.shape[0]), pn)
    p_cols = np.concatenate([pi[r, : pn[r]] for r in range(pn.shape[0])]).astype(np.int64)
    tiles = _partial_tiles(plan, mask, head, p_rows, p_cols, q_pos, kv_pos)
    tile_of = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(p_rows, p_cols))}
    q_valid_all = (q_pos >= 0).numpy().reshape(-1, bq)
    out = []
    for r in range(pn.shape[0]):
        blocks = np.concatenate([pi[r, : pn[r]], fi[r, : fn[r]]]).astype(np.int64)
        if blocks.size == 0:
            continue
        partial = np.concatenate([np.ones(pn[r], bool), np.zeros(fn[r], bool)])
        order = np.argsort(blocks, kind="stable")
        blocks, partial = blocks[order], partial[order]
        q_valid = q_valid_all[r]
        full = np.broadcast_to(q_valid[:, None], (bq, bk))

        def allowed_of(lo, hi, r=r, full=full):
            tile = [tiles[tile_of[(r, c)]] if (r, c) in tile_of else full for c in range(lo, hi)]
            return np.concatenate(tile, axis=1)[:, : min(hi * bk, kv_len) - lo * bk]

        runs = list(_runs(blocks, partial))
        if len(runs) >= GATHER_MIN_RUNS:
            allowed = np.concatenate([allowed_of(lo, hi) for lo, hi, _ in runs], axis=1)
            slots = np.concatenate([np.arange(lo * bk, min(hi * bk, kv_len)) for lo, hi, _ in runs])
            keep = allowed.any(0)
            if keep.any():
                tile = allowed[:, keep]
                dense = (tile | ~q_valid[:, None]).all()
                out.append((r, slots[keep], None if dense else torch.from_numpy(tile.copy()), True))
            continue
        for lo, hi, is_partial in runs:
            t_lo, t_hi = lo * bk, min(hi * bk, kv_len)
            if not is_partial:
                out.append((r, np.arange(t_lo, t_hi), None, False))
                continue
            allowed = allowed_of(lo, hi)
            cols = np.nonzero(allowed.any(0))[0]
            if cols.size == 0:
                continue
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            tile = allowed[:, c0:c1]
            dense = (tile | ~q_valid[:, None]).all()
            out.append((r, np.arange(t_lo + c0, t_lo + c1), None if dense else torch.from_numpy(tile.copy()), False))
    return out


def _runs(blocks: np.ndarray, partial: np.ndarray):
    """Contiguous runs of sorted kv blocks as ``(lo, hi, has_partial)``, with long stretches
    of full blocks split off so they need no bias."""
    cut = np.nonzero(np.diff(blocks) != 1)[0] + 1
    for run_b, run_p in zip(np.split(blocks, cut), np.split(partial, cut)):
        # sub-runs of constant status
        edges = np.nonzero(np.diff(run_p.astype(np.int8)))[0] + 1
        pieces = [
            (int(b[0]), int(b[-1]) + 1, bool(p[0])) for b, p in zip(np.split(run_b, edges), np.split(run_p, edges))
        ]
        merged: list[list] = []
        for lo, hi, p in pieces:
            keep_apart = not p and hi - lo > MERGE_FULL_BLOCKS
            if merged and not keep_apart and not merged[-1][3]:
                merged[-1][1] = hi
                merged[-1][2] |= p
            else:
                merged.append([lo, hi, p, keep_apart])
        for lo, hi, p, _ in merged:
            yield lo, hi, p


def _group(segments, nqb: int, g: int, bq: int) -> list[_Group]:
    """Batch segments into kernel calls: contiguous segments of equal length whose rows and kv
    starts advance in lock step; gathered segments of similar length (padded up to a multiple
    of :data:`GATHER_PAD` with masked columns)."""
    classes: dict[tuple[int, bool, int], list] = {}
    gathered: dict[int, list] = {}
    seen: dict[tuple[int, int, bool], int] = {}
    for r, slots, tile in ((s[0], s[1], s[2]) for s in segments if not s[3]):
        k = (len(slots), tile is not None)
        nth = seen.get((r, *k), 0)
        seen[(r, *k)] = nth + 1
        classes.setdefault((*k, nth), []).append((r, slots, tile))
    for r, slots, tile in ((s[0], s[1], s[2]) for s in segments if s[3]):
        gathered.setdefault(-(-len(slots) // GATHER_PAD) * GATHER_PAD, []).append((r, slots, tile))
    groups: list[_Group] = []
    written = np.zeros(nqb, bool)
    for length, segs in sorted(gathered.items()):
        groups.append(_make_group(sorted(segs, key=lambda s: s[0]), length, g, bq, written, False, True))
    # large classes first: the groups covering most rows write directly, later ones merge
    leftovers = []
    for (length, _, _), segs in sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        segs.sort(key=lambda s: s[0])
        chains = _chains(segs)
        if len(chains) > MAX_CHAINS:
            chains = [segs]
        for chain in chains:
            if len(chain) == 1:
                leftovers.append(chain[0])
            else:
                groups.append(_make_group(chain, length, g, bq, written))
    # lone segments (the ramp at the start of a window, ...) share padded calls: each call costs
    # a parallel region, which on a busy machine costs more than the padding
    buckets: list[tuple[int, list]] = []
    for seg in sorted(leftovers, key=lambda s: (-len(s[1]), s[0])):
        home = next(
            (b for b in buckets if 2 * len(seg[1]) >= b[0] and all(s[0] != seg[0] for s in b[1])),
            None,
        )
        if home is None:
            buckets.append((len(seg[1]), [seg]))
        else:
            home[1].append(seg)
    for length, segs in buckets:
        segs.sort(key=lambda s: s[0])
        groups.append(_make_group(segs, length, g, bq, written, regular=len(segs) == 1))
    return groups


def _chains(segs):
    chains, cur = [], [segs[0]]
    for s in segs[1:]:
        if len(cur) == 1:
            ok = s[0] > cur[0][0] and s[1][0] >= cur[0][1][0]
        else:
            dr, ds = cur[1][0] - cur[0][0], cur[1][1][0] - cur[0][1][0]
            ok = s[0] - cur[-1][0] == dr and s[1][0] - cur[-1][1][0] == ds
        if ok:
            cur.append(s)
        else:
            chains.append(cur)
            cur = [s]
    chains.append(cur)
    return chains


def _make_group(
    chain, length: int, g: int, bq: int, written: np.ndarray, regular: bool = True, gathered: bool = False
) -> _Group:
    """One call from segments ``(row, kv slots, tile)``; slots shorter than ``length`` are padded
    with masked columns (only gathered segments are, ``regular=False``)."""
    rows = [s[0] for s in chain]
    n = len(chain)
    row_steps = {b - a for a, b in zip(rows, rows[1:])}
    row_slice = None
    if n == 1:
        row_slice = slice(rows[0], rows[0] + 1)
    elif len(row_steps) == 1:
        row_slice = slice(rows[0], rows[-1] + 1, row_steps.pop())
    kv_step = None
    starts = [int(s[1][0]) for s in chain]
    if regular:
        kv_steps = {b - a for a, b in zip(starts, starts[1:])}
        if n == 1:
            kv_step = 0
        elif len(kv_steps) == 1 and min(kv_steps) >= 0:
            kv_step = kv_steps.pop()
    kv_index = torch.zeros(n, length, dtype=torch.int64)
    padded = False
    for i, s in enumerate(chain):
        kv_index[i, : len(s[1])] = torch.from_numpy(s[1])
        # padding repeats a real slot; its column is masked below
        kv_index[i, len(s[1]) :] = int(s[1][0])
        padded |= len(s[1]) < length
    bias = dead = None
    tiles = [s[2] for s in chain]
    if padded or any(t is not None for t in tiles):
        allowed = torch.zeros(n, bq, length, dtype=torch.bool)
        for i, (s, t) in enumerate(zip(chain, tiles)):
            allowed[i, :, : len(s[1])] = True if t is None else t
        # rows with no key here (padding past q_len included) stay all -inf: the kernel gives
        # them zeros and the backward zero probabilities
        dead_rows = ~allowed.any(-1)
        bias = _bias_tile(allowed, g)
        if g > 1:
            dead_rows = dead_rows.unsqueeze(1).expand(n, g, bq).reshape(n, g * bq)
        dead = dead_rows if bool(dead_rows.any()) else None
    first = not bool(written[rows].any())
    fresh = None if first or written[rows].all() else torch.tensor([r for r in rows if not written[r]])
    written[rows] = True
    return _Group(
        torch.tensor(rows),
        row_slice,
        length,
        starts[0],
        kv_step,
        kv_index,
        bias,
        dead,
        first,
        gathered=gathered,
        fresh=fresh,
    )


def _bias_tile(allowed: torch.Tensor, g: int) -> torch.Tensor:
    """``[n, bq, L]`` allowed -> ``[1, n or 1, g*bq, L]`` float ``0 / -inf``; a tile shared by
    every row is kept once and broadcast by the kernel."""
    n, bq, length = allowed.shape
    if n > 1 and bool((allowed == allowed[:1]).all()):
        allowed = allowed[:1]
        n = 1
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, _NEG)
    if g > 1:
        bias = bias.unsqueeze(1).expand(n, g, bq, length).reshape(n, g * bq, length)
    return bias.unsqueeze(0).contiguous()


# -- execution ---------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_kernel_order(x: torch.Tensor, order: torch.Tensor | None, dtype: torch.dtype, width: int) -> torch.Tensor:
    x = x.to(dtype)
    if order is not None:
        x = x.index_select(2, order.to(x.device))
    if x.shape[-1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    return x


def _unit_q(x: torch.Tensor, unit: _Unit, nqb: int, bq: int) -> torch.Tensor:
    """[B, H, Sq, D] -> [B * n_kv, nqb, g * bq, D] for a unit (a view where possible)."""
    b, h, sq, d = x.shape
    n_kv, g = unit.q_heads.shape
    heads = unit.q_heads.flatten()
    first = int(heads[0])
    if torch.equal(heads, torch.arange(first, first + heads.numel())):
        xu = x.narrow(1, first, heads.numel())
    else:
        xu = x.index_select(1, heads.to(x.device))
    if nqb * bq != sq:
        xu = torch.nn.functional.pad(xu, (0, 0, 0, nqb * bq - sq))
    xu = xu.reshape(b * n_kv, g, nqb, bq, d)
    if g == 1:
        return xu.view(b * n_kv, nqb, bq, d)
    return xu.transpose(1, 2).reshape(b * n_kv, nqb, g * bq, d)


def _unit_kv(x: torch.Tensor, unit: _Unit) -> torch.Tensor:
    """[B, Hkv, Skv, D] -> [B * n_kv, Skv, D] (a view when the unit's kv heads are consecutive)."""
    b, _, skv, d = x.shape
    kvh = unit.kv_heads
    first = int(kvh[0])
    if torch.equal(kvh, torch.arange(first, first + kvh.numel())):
        xu = x.narrow(1, first, kvh.numel())
    else:
        xu = x.index_select(1, kvh.to(x.device))
    return xu.reshape(b * kvh.numel(), skv, d)


def _by_head(x: torch.Tensor, g: int) -> torch.Tensor:
    """[BH, nqb, g*bq, D] -> [BH, g, nqb*bq, D]: each query head's rows in sequence order."""
    bh, nqb, gbq, d = x.shape
    return x.view(bh, nqb, g, gbq // g, d).transpose(1, 2).reshape(bh, g, -1, d)


def _by_block(x: torch.Tensor, g: int, bq: int) -> torch.Tensor:
    """Inverse of :func:`_by_head`: [BH, g, nqb*bq, D] -> [BH, nqb, g*bq, D]."""
    bh, _, s, d = x.shape
    return x.view(bh, g, s // bq, bq, d).transpose(1, 2).reshape(bh, s // bq, g * bq, d)


def _shared(x: torch.Tensor, g: int) -> torch.Tensor:
    """[BH, Skv, D] -> [BH, g, Skv, D] without a copy."""
    return x.unsqueeze(1).expand(-1, g, -1, -1)


def _pieces(grp: _Group, batch_heads: int, width: int, itemsize: int) -> list[_Group]:
    """A group whose K/V are gathered by index, cut into row pieces whose gathered K and V fit
    :data:`GATHER_BYTES` (view groups cost no memory and stay whole)."""
    per_row = 2 * batch_heads * grp.length * width * itemsize
    n = grp.rows.numel()
    if grp.kv_step is not None or grp.causal or n * per_row <= GATHER_BYTES:
        return [grp]
    step = max(1, GATHER_BYTES // per_row)
    out = []
    for i in range(0, n, step):
        rows = grp.rows[i : i + step]
        fresh = None
        if grp.fresh is not None:
            fresh = grp.fresh[torch.isin(grp.fresh, rows)]
            fresh = fresh if fresh.numel() else None
        out.append(
            replace(
                grp,
                rows=rows,
                row_slice=None,
                kv_index=grp.kv_index[i : i + step],
                bias=grp.bias if grp.bias is None or grp.bias.shape[1] == 1 else grp.bias[:, i : i + step],
                dead=None if grp.dead is None else grp.dead[i : i + step],
                fresh=fresh,
            )
        )
    return out


def _rows(x: torch.Tensor, grp: _Group) -> torch.Tensor:
    return x[:, grp.row_slice] if grp.row_slice is not None else x.index_select(1, grp.rows.to(x.device))


def _band(x: torch.Tensor, grp: _Group) -> torch.Tensor:
    """[BH, Skv, D] -> [BH, n, length, D] kv tokens of each row (strided view when regular)."""
    n = grp.rows.numel()
    if grp.kv_step == 0:
        return x.narrow(1, grp.kv_start, grp.length).unsqueeze(1).expand(-1, n, -1, -1)
    if grp.kv_step is not None:
        span = (n - 1) * grp.kv_step + grp.length
        return x.narrow(1, grp.kv_start, span).unfold(1, grp.length, grp.kv_step).transpose(-1, -2)
    idx = grp.kv_index.flatten().to(x.device)
    return x.index_select(1, idx).view(x.shape[0], n, grp.length, x.shape[-1])


def _runtime_bias(mask_tensor: torch.Tensor, grp: _Group, unit: _Unit, prep: _Prepared, shape_bhqk, dtype):
    """Gather the model's mask tensor onto a group's tiles: [B * n_kv, n, g*bq, length] float."""
    b, h, sq, skv = shape_bhqk
    n_kv, g = unit.q_heads.shape
    bq, n, length = prep.block_q, grp.rows.numel(), grp.length
    dev = mask_tensor.device
    mt = mask_tensor.expand(b, h, sq, skv)
    q_slots = grp.rows.view(-1, 1) * bq + torch.arange(bq).view(1, -1)  # [n, bq]
    q_valid = q_slots < sq
    q_slots = q_slots.clamp(max=sq - 1)
    q_model = q_slots if prep.q_order is None else prep.q_order[q_slots]
    kv_model = grp.kv_index if prep.kv_order is None else prep.kv_order[grp.kv_index]
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1, 1, 1)
    hi = unit.q_heads.to(dev).view(1, n_kv, 1, g, 1, 1)
    qi = q_model.to(dev).view(1, 1, n, 1, bq, 1)
    ki = kv_model.to(dev).view(1, 1, n, 1, 1, length)
    tile = mt[bi, hi, qi, ki]  # [B, n_kv, n, g, bq, length]
    if tile.dtype == torch.bool:
        tile = torch.zeros(tile.shape, dtype=dtype, device=dev).masked_fill_(~tile, _NEG)
    else:
        tile = tile.to(dtype)
    tile = tile.masked_fill(~q_valid.to(dev).view(1, 1, n, 1, bq, 1), 0.0)
    return tile.reshape(b * n_kv, n, g * bq, length)


def _group_bias(grp, unit, prep, mask_tensor, shape_bhqk, dtype):
    """(bias or None, dead rows or None) for one call."""
    bias = grp.bias.to(dtype) if grp.bias is not None else None
    if mask_tensor is None:
        return bias, grp.dead
    rt = _runtime_bias(mask_tensor, grp, unit, prep, shape_bhqk, dtype)
    bias = rt if bias is None else rt + bias
    dead = torch.isneginf(bias).all(-1)
    return bias, dead


def _merge(out_acc, lse_acc, grp, o, lse):
    """Write a call's ``(o, lse)`` into its rows, or combine them with what earlier calls wrote
    there (in place over the rows, weights from the log-sum-exps)."""
    rows = grp.row_slice if grp.row_slice is not None else grp.rows.to(o.device)
    if grp.first:
        if grp.row_slice is not None:
            out_acc[:, rows] = o
            lse_acc[:, rows] = lse
        else:
            out_acc.index_copy_(1, rows, o)
            lse_acc.index_copy_(1, rows, lse)
        return
    if grp.row_slice is not None:
        o_old, l_old = out_acc[:, rows], lse_acc[:, rows]
    else:
        o_old, l_old = out_acc.index_select(1, rows), lse_acc.index_select(1, rows)
    m = torch.maximum(l_old, lse)
    m = m.masked_fill(torch.isneginf(m), 0.0)
    a, b = torch.exp(l_old - m), torch.exp(lse - m)
    s = a + b
    inv = torch.where(s > 0, s.reciprocal(), 0.0)
    l_new = m + torch.log(s)
    o_old.mul_((a * inv).unsqueeze(-1).to(o_old.dtype)).addcmul_(o, (b * inv).unsqueeze(-1).to(o_old.dtype))
    l_old.copy_(l_new)
    if grp.row_slice is None:
        out_acc.index_copy_(1, rows, o_old)
        lse_acc.index_copy_(1, rows, l_old)


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised result buffers: every row is written by a call or filled explicitly
    (tests replace this with a NaN fill to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _direct(unit: _Unit, num_heads: int, batch: int) -> int | None:
    """First head when a unit's accumulator can be a view of the final output (one query
    head per kv head, consecutive heads, and the batch folds into them); else None."""
    heads = unit.q_heads.flatten()
    h0, n = int(heads[0]), heads.numel()
    if unit.q_heads.shape[1] != 1 or not torch.equal(heads, torch.arange(h0, h0 + n)):
        return None
    return h0 if batch == 1 or n == num_heads else None


def _in_kernel_order(plan, q, k, v, mask_tensor):
    """(the prepared plan, compute dtype, padded head width, (q, k, v) in kernel order and that
    dtype and width)."""
    dtype = _compute_dtype(q.dtype)
    prep = prepare(plan, q.device, mask_tensor is not None)
    width = max(plan.head_dim, plan.head_dim_v)
    qk = _to_kernel_order(q, prep.q_order, dtype, width)
    kk = _to_kernel_order(k, prep.kv_order, dtype, width)
    vk = _to_kernel_order(v, prep.kv_order, dtype, width)
    return prep, dtype, width, (qk, kk, vk)


def _forward(plan, q, k, v, mask_tensor):
    """``(out [B, H, nqb*bq, width], lse [B, H, nqb*bq] fp32)`` in kernel order, compute dtype,
    padded past ``Sq`` (and past ``Dv`` up to ``width``)."""
    prep, dtype, width, (qk, kk, vk) = _in_kernel_order(plan, q, k, v, mask_tensor)
    b, h, sq, _ = q.shape
    nqb, bq = prep.num_q_blocks, prep.block_q
    shape = (b, h, sq, plan.kv_len)
    only = prep.units[0] if len(prep.units) == 1 and prep.units[0].groups else None
    if only is not None and only.groups[0].causal and _direct(only, h, b) is not None:
        # the whole plan is one causal call: its output is the result, no copy
        o, lse = _fwd(qk, kk, vk, 0.0, True, scale=plan.scale)
        return prep, o, lse.float()
    out = _empty((b, h, nqb * bq, width), dtype, q.device)
    lse_out = _empty((b, h, nqb * bq), torch.float32, q.device)
    for unit in prep.units:
        n_kv, g = unit.q_heads.shape
        qu = _unit_q(qk, unit, nqb, bq)
        ku, vu = _unit_kv(kk, unit), _unit_kv(vk, unit)
        h0 = _direct(unit, h, b)
        if h0 is not None:
            out_acc = out.narrow(1, h0, n_kv).view(b * n_kv, nqb, bq, width)
            lse_acc = lse_out.narrow(1, h0, n_kv).view(b * n_kv, nqb, bq)
        else:
            out_acc = _empty(qu.shape, dtype, q.device)
            lse_acc = _empty(qu.shape[:-1], torch.float32, q.device)
        if unit.uncovered is not None:
            rows = unit.uncovered.to(q.device)
            out_acc.index_fill_(1, rows, 0.0)
            lse_acc.index_fill_(1, rows, _NEG)
        for grp in (p for whole in unit.groups for p in _pieces(whole, ku.shape[0], width, qu.element_size())):
            if grp.causal:
                o, lse = _fwd(_by_head(qu, g), _shared(ku, g), _shared(vu, g), 0.0, True, scale=plan.scale)
                out_acc.copy_(_by_block(o, g, bq))
                lse_acc.copy_(_by_block(lse.unsqueeze(-1), g, bq).squeeze(-1))
                continue
            bias, dead = _group_bias(grp, unit, prep, mask_tensor, shape, dtype)
            qg, kg, vg = _rows(qu, grp), _band(ku, grp), _band(vu, grp)
            if bias is None and grp.kv_step == 0 and grp.row_slice is not None and grp.row_slice.step in (None, 1):
                # every row sees the same keys: one long query sequence
                o, lse = _fwd(qg.flatten(1, 2).unsqueeze(1), kg[:, :1], vg[:, :1], 0.0, False, scale=plan.scale)
                o, lse = o.view(qg.shape), lse.view(qg.shape[:-1])
            else:
                o, lse = _fwd(qg, kg, vg, 0.0, False, attn_mask=bias, scale=plan.scale)
            lse = lse.float()
            if dead is not None:
                lse = lse.masked_fill(dead, _NEG)
            if grp.fresh is not None:
                # rows merged here for the first time start from nothing
                out_acc.index_fill_(1, grp.fresh.to(q.device), 0.0)
                lse_acc.index_fill_(1, grp.fresh.to(q.device), _NEG)
            _merge(out_acc, lse_acc, grp, o, lse)
        if h0 is None:
            heads = unit.q_heads.flatten().to(q.device)
            x = out_acc.view(b, n_kv, nqb, g, bq, width).transpose(2, 3).reshape(b, n_kv * g, nqb * bq, width)
            out.index_copy_(1, heads, x)
            x = lse_acc.view(b, n_kv, nqb, g, bq).transpose(2, 3).reshape(b, n_kv * g, nqb * bq)
            lse_out.index_copy_(1, heads, x)
    return prep, out, lse_out


def _finish(x: torch.Tensor, prep: _Prepared, sq: int, dtype: torch.dtype, last: int | None = None) -> torch.Tensor:
    """Cut the padding, return to model order and dtype: one contiguous result, copied at most once."""
    x = x[:, :, :sq] if last is None else x[:, :, :sq, :last]
    if prep.q_inverse is not None:
        return x.index_select(2, prep.q_inverse.to(x.device)).to(dtype)
    if x.dtype != dtype:
        return x.to(dtype, memory_format=torch.contiguous_format)
    return x.contiguous()


def attention_torch_forward(plan, q, k, v, mask_tensor=None):
    """Block-sparse attention on CPU: ``(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32)``
    (no autograd graph: :func:`attncc.runtime.ops.attention` differentiates it through
    :func:`attention_torch_backward`). Rows with no allowed key give zeros and ``lse = -inf``."""
    q, k, v = unit_stride_rows(q, k, v)
    with torch.no_grad():
        prep, out, lse = _forward(plan, q, k, v, mask_tensor)
        sq = q.shape[2]
        return _finish(out, prep, sq, q.dtype, plan.head_dim_v), _finish(lse, prep, sq, torch.float32)


def attention_torch_backward(plan, q, k, v, out, lse, dout, mask_tensor=None):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_torch_forward` given its ``out`` and ``lse``
    (``lse`` itself is treated as non-differentiable). Walks the forward's groups with the
    fused CPU backward kernel: each group contributes with the *final* row statistics."""
    q, k, v, out, dout = unit_stride_rows(q, k, v, out, dout)
    prep, dtype, width, (qk, kk, vk) = _in_kernel_order(plan, q, k, v, mask_tensor)
    ok = _to_kernel_order(out, prep.q_order, dtype, width)
    dok = _to_kernel_order(dout, prep.q_order, dtype, width)
    lk = lse.float() if prep.q_order is None else lse.float().index_select(2, prep.q_order.to(lse.device))
    # rows with no key: every P is zero whatever finite lse is used
    lk = torch.where(torch.isneginf(lk), torch.zeros((), dtype=lk.dtype), lk).unsqueeze(-1)
    b, h, sq, _ = q.shape
    shape = (b, h, sq, plan.kv_len)
    dq = torch.zeros_like(qk)
    dk = torch.zeros_like(kk)
    dv = torch.zeros_like(vk)
    for unit in prep.units:
        qu = _unit_q(qk, unit, prep.num_q_blocks, prep.block_q)
        ou = _unit_q(ok, unit, prep.num_q_blocks, prep.block_q)
        du = _unit_q(dok, unit, prep.num_q_blocks, prep.block_q)
        lu = _unit_q(lk, unit, prep.num_q_blocks, prep.block_q).squeeze(-1).to(dtype)
        ku, vu = _unit_kv(kk, unit), _unit_kv(vk, unit)
        dq_u = torch.zeros_like(qu)
        dk_u = torch.zeros_like(ku)
        dv_u = torch.zeros_like(vu)
        for grp in (p for whole in unit.groups for p in _pieces(whole, ku.shape[0], width, qu.element_size())):
            if grp.causal:
                g = unit.q_heads.shape[1]
                lse_rows = _by_head(lu.unsqueeze(-1), g).squeeze(-1).float().contiguous()
                gq, gk, gv = _bwd(
                    _by_head(du, g).contiguous(),
                    _by_head(qu, g),
                    _shared(ku, g),
                    _shared(vu, g),
                    _by_head(ou, g).contiguous(),
                    lse_rows,
                    0.0,
                    True,
                    scale=plan.scale,
                )
                dq_u += _by_block(gq, g, prep.block_q)
                dk_u += gk.sum(1)
                dv_u += gv.sum(1)
                continue
            bias, _ = _group_bias(grp, unit, prep, mask_tensor, shape, dtype)
            qg, kg, vg = _rows(qu, grp), _band(ku, grp), _band(vu, grp)
            gq, gk, gv = _bwd(
                _rows(du, grp).contiguous(),
                qg,
                kg,
                vg,
                _rows(ou, grp).contiguous(),
                _rows(lu, grp).float().contiguous(),
                0.0,
                False,
                attn_mask=bias,
                scale=plan.scale,
            )
            rows = grp.rows.to(q.device)
            dq_u.index_add_(1, rows, gq)
            idx = grp.kv_index.flatten().to(q.device)
            dk_u.index_add_(1, idx, gk.reshape(gk.shape[0], -1, gk.shape[-1]))
            dv_u.index_add_(1, idx, gv.reshape(gv.shape[0], -1, gv.shape[-1]))
        n_kv, g = unit.q_heads.shape
        x = dq_u.reshape(b, n_kv, prep.num_q_blocks, g, prep.block_q, width)
        x = x.transpose(2, 3).reshape(b, n_kv * g, -1, width)[:, :, :sq]
        dq.index_add_(1, unit.q_heads.flatten().to(q.device), x)
        dk.index_add_(1, unit.kv_heads.to(q.device), dk_u.view(b, n_kv, -1, width))
        dv.index_add_(1, unit.kv_heads.to(q.device), dv_u.view(b, n_kv, -1, width))
    dq, dk, dv = dq[..., : plan.head_dim], dk[..., : plan.head_dim], dv[..., : plan.head_dim_v]
    if prep.q_inverse is not None:
        inv = prep.q_inverse.to(q.device)
        dq, dk, dv = dq.index_select(2, inv), dk.index_select(2, inv), dv.index_select(2, inv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
