"""The decode path on CPU: per class of kv heads with the same decode table, the kept kv tokens
(a few contiguous runs) concatenated once, against every query head of those kv heads packed as
rows (GQA packing, a view of q), in one call of ATen's fused CPU attention with a ``0 / -inf``
bias over the partial blocks' tokens. Cost per call: O(rows x kept tokens), whatever the context
length; what depends only on the plan (runs, bias, rows with no key) is prepared once per plan,
so the layers of one decode step share it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from attncc.codegen.common import unit_stride_rows
from attncc.codegen.decode.table import DecodeTable, decode_table
from attncc.ir.plan import AttentionPlan

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_NEG = float("-inf")


@dataclass(frozen=True)
class _Class:
    """kv heads ``first .. first + n - 1`` sharing one token list."""

    first: int
    n: int
    runs: tuple[tuple[int, int], ...]  # (start, length) of the kept kv token runs, ascending
    tokens: torch.Tensor  # [T] int64 kept kv tokens (the runs, in order)
    bias: dict[torch.dtype, torch.Tensor] | None  # [1, n or 1, g*Sq, T] 0 / -inf, by compute dtype
    dead: torch.Tensor | None  # [1, n, g*Sq] bool: rows with no allowed key


@dataclass(frozen=True)
class _Prepared:
    classes: tuple[_Class, ...]
    #: True when the classes cover the kv heads in order, so out and lse are views of one result
    in_order: bool


def _runs(tokens: torch.Tensor) -> tuple[tuple[int, int], ...]:
    if tokens.numel() == 0:
        return ()
    breaks = (tokens[1:] != tokens[:-1] + 1).nonzero().flatten() + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), tokens.numel()]
    return tuple((int(tokens[a]), b - a) for a, b in zip(starts, ends))


def _allowed(plan: AttentionPlan, heads: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``[len(heads), Sq, len(kv)]`` bool: the plan's structural mask for these heads and keys."""
    q = torch.arange(plan.q_len).view(1, -1, 1) + plan.q_offset
    out = torch.empty(heads.numel(), plan.q_len, kv.numel(), dtype=torch.bool)
    programs = torch.tensor(plan.head_to_program)[heads]
    for p in programs.unique().tolist():
        rows = (programs == p).nonzero().flatten()
        hs = heads[rows].view(-1, 1, 1)
        out[rows] = (
            plan.programs[p].dense(hs, q, kv.view(1, 1, -1), plan.q_len, plan.kv_len).expand(rows.numel(), -1, -1)
        )
    return out


def _merge_runs(runs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """(start, end) runs sorted and joined where they touch -> (start, length) runs."""
    out: list[list[int]] = []
    for a, e in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([a, e])
    return tuple((a, e - a) for a, e in out)


def _class(plan: AttentionPlan, table: DecodeTable, kv_heads: tuple[int, ...]) -> list[_Class]:
    """The class of ``kv_heads`` (equal block lists), cut into runs of consecutive kv heads. A
    partial block is trimmed to the tokens some row may attend; the bias covers only tokens
    some row may not."""
    kvh = kv_heads[0]
    bk, g, sq, kv_len = table.block_kv, plan.gqa_group, plan.q_len, plan.kv_len
    nf, np_ = int(table.full_num[kvh]), int(table.part_num[kvh])
    full_runs = [(b * bk, min((b + 1) * bk, kv_len)) for b in table.full_idx[kvh, :nf].tolist()]
    ptok = (table.part_idx[kvh, :np_].long().view(-1, 1) * bk + torch.arange(bk)).flatten()
    ptok = ptok[ptok < kv_len]
    out = []
    for first, n in _consecutive(kv_heads):
        bias = dead = None
        runs = list(full_runs)
        if ptok.numel():
            allowed = _allowed(plan, torch.arange(first * g, (first + n) * g), ptok)  # [n*g, Sq, Tp]
            some = allowed.flatten(0, 1).any(0)
            kept, allowed = ptok[some], allowed[:, :, some]
            runs += [(a, a + length) for a, length in _runs(kept)]
            merged = _merge_runs(runs)
            tokens = torch.cat([torch.arange(a, a + length) for a, length in merged]) if merged else ptok[:0]
            if not bool(allowed.all()):
                base = torch.zeros(1, n, g * sq, tokens.numel())
                cols = torch.searchsorted(tokens, kept)
                base[..., cols] = torch.zeros(allowed.shape).masked_fill_(~allowed, _NEG).view(1, n, g * sq, -1)
                if not full_runs:
                    rows = ~allowed.any(-1).view(1, n, g * sq)
                    dead = rows if bool(rows.any()) else None
                if n > 1 and bool((base == base[:, :1]).all()):
                    base = base[:, :1]
                bias = {torch.float32: base, torch.float64: base.double()}
        else:
            merged = _merge_runs(runs)
            tokens = torch.cat([torch.arange(a, a + length) for a, length in merged]) if merged else ptok[:0]
        if tokens.numel() == 0:
            dead = torch.ones(1, n, g * sq, dtype=torch.bool)
        out.append(_Class(first, n, merged, tokens, bias, dead))
    return out


def _consecutive(heads: tuple[int, ...]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for h in heads:
        if out and h == out[-1][0] + out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([h, 1])
    return [(a, n) for a, n in out]


_prepared: dict[AttentionPlan, _Prepared] = {}
_LOCK = threading.Lock()
_PREPARED_MAX = 1024


def _prepare(plan: AttentionPlan) -> _Prepared:
    with _LOCK:
        hit = _prepared.get(plan)
    if hit is None:
        table = decode_table(plan)
        classes = tuple(c for kv_heads in table.classes for c in _class(plan, table, kv_heads))
        in_order = [(c.first, c.n) for c in classes] == [(0, plan.num_kv_heads)]
        hit = _Prepared(classes, in_order)
        with _LOCK:
            if len(_prepared) >= _PREPARED_MAX:
                _prepared.clear()
            _prepared[plan] = hit
    return hit


def _gather(x: torch.Tensor, c: _Class, dtype: torch.dtype) -> torch.Tensor:
    """``[B, n, T, D]``: the class's kv heads at its kept tokens, in ``dtype``."""
    x = x.narrow(1, c.first, c.n)
    if not c.runs:  # no key kept at all
        return x.narrow(2, 0, 0).to(dtype)
    if len(c.runs) == 1:
        start, length = c.runs[0]
        x = x.narrow(2, start, length)
    elif len(c.runs) <= 8:
        x = torch.cat([x.narrow(2, a, n) for a, n in c.runs], 2)
    else:
        x = x.index_select(2, c.tokens)
    return unit_stride_rows(x.to(dtype))[0]


def decode_torch_forward(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_tensor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] fp32)`` of a plan that takes the decode
    path (:func:`attncc.codegen.decode.table.unsupported` is None). Rows with no allowed key give
    zeros and ``lse = -inf``."""
    prep = _prepare(plan)
    (q,) = unit_stride_rows(q)  # k and v: their kept tokens, after the gather
    b, h, sq, d = q.shape
    g = plan.gqa_group
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    width = max(d, plan.head_dim_v)
    outs, lses = [], []
    with torch.no_grad():
        for c in prep.classes:
            qq = q.narrow(1, c.first * g, c.n * g).reshape(b, c.n, g * sq, d).to(dtype)  # GQA rows
            kk, vv = _gather(k, c, dtype), _gather(v, c, dtype)
            if kk.shape[2] == 0:
                outs.append(qq.new_zeros(b, c.n, g * sq, plan.head_dim_v))
                lses.append(qq.new_full((b, c.n, g * sq), _NEG, dtype=torch.float32))
                continue
            if width != d or width != plan.head_dim_v:
                qq, kk, vv = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (qq, kk, vv))
            bias, dead = c.bias[dtype] if c.bias is not None else None, c.dead
            if mask_tensor is not None:
                bias, dead = _with_model_mask(plan, mask_tensor, c, bias, (b, h, sq), dtype, kk.shape[2])
            if bool(torch.isfinite(kk).all()):
                o, lse = _fwd(qq, kk, vv, 0.0, False, attn_mask=bias, scale=plan.scale)
            else:
                o, lse = _by_selection(qq, kk, vv, bias, plan.scale)
            lse = lse.float()
            if dead is not None:
                lse = lse.masked_fill(dead, _NEG)
                o = o.masked_fill(dead.unsqueeze(-1), 0.0)
            outs.append(o[..., : plan.head_dim_v])
            lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, 1)
    if not prep.in_order:
        heads = torch.tensor([hh for c in prep.classes for hh in range(c.first * g, (c.first + c.n) * g)])
        inverse = torch.empty_like(heads)
        inverse[heads] = torch.arange(heads.numel())
        out = out.reshape(b, h, sq, -1).index_select(1, inverse)
        lse = lse.reshape(b, h, sq).index_select(1, inverse)
    return out.reshape(b, h, sq, -1).to(q.dtype), lse.reshape(b, h, sq).contiguous()


def _by_selection(qq, kk, vv, bias, scale: float):
    """Attention masking by selection where ``bias`` is ``-inf``: a non-finite kept key reaches
    exactly the rows that may see it (an additive bias would spread its NaN to every row)."""
    scores = torch.matmul(qq, kk.transpose(-1, -2)) * scale
    allowed = torch.ones((), dtype=torch.bool) if bias is None else ~torch.isneginf(bias)
    if bias is not None:
        scores = torch.where(allowed, scores + bias.masked_fill(~allowed, 0.0), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.where(allowed, torch.exp(scores - shift.unsqueeze(-1)), torch.zeros((), dtype=scores.dtype))
    return torch.matmul(p, vv), lse


def _with_model_mask(plan, mask_tensor, c: _Class, bias, bhs, dtype, t):
    """The class's bias with the model's mask tensor added (bool: ``-inf`` where False), and its
    rows with no allowed key."""
    b, h, sq = bhs
    g = plan.gqa_group
    m = torch.broadcast_to(mask_tensor, (b, h, sq, plan.kv_len)).narrow(1, c.first * g, c.n * g)
    m = m.index_select(3, c.tokens).reshape(b, c.n, g * sq, t)
    base = torch.zeros((), dtype=dtype) if bias is None else bias
    if m.dtype == torch.bool:
        full = base.expand(b, c.n, g * sq, t).masked_fill(~m, _NEG)
    else:
        full = base + m.to(dtype)
    dead = torch.isneginf(full).all(-1)
    return full, (dead if bool(dead.any()) else None)
