"""Attention benchmark matrix: attncc vs compiled FlexAttention vs dense and masked SDPA.

    python -m bench.attention --quick            # S=4096, the target matrix (< 5 min on 2 cores)
    python -m bench.attention --long            # also S=8192 and 16384
    python -m bench.attention --json            # write bench/results/<machine>-<date>.json
    python -m bench.attention --compile-overhead
    python -m bench.attention --scale           # block-table build time and peak memory, 128k / 1M tokens

Every implementation is timed in the same process, interleaved (one call of each per repeat,
after a warm-up), and the median is reported. Only ratios between columns mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attncc.codegen.documents import document_table
from attncc.ir import masks as M
from attncc.ir.documents import same_document
from attncc.ir.permute import TilePermutation
from attncc.ir.plan import AttentionPlan
from bench.machine import machine_name as bench_machine

RESULTS = Path(__file__).parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One mask of the matrix: attncc programs per head and the same predicate for FlexAttention."""

    name: str
    programs: tuple[M.Mask, ...]
    head_to_program: tuple[int, ...]
    permute: TilePermutation | None = None
    grid: tuple[int, int, int] | None = None  # tile3d: the sequence length is fixed by the grid
    #: packed documents: this many, causal inside each (ids from :func:`document_ids`)
    documents: int = 0


def _causal() -> M.Mask:
    return M.Causal()


def _window(n: int) -> M.Mask:
    return M.All((M.Causal(), M.Window(n - 1, 0)))


def _sink_window(sink: int, n: int) -> M.Mask:
    return M.All((M.Causal(), M.Any_((M.Sink(sink), M.Window(n - 1, 0)))))


def cases(heads: int) -> list[Case]:
    half = heads // 2
    return [
        Case("causal", (_causal(),), (0,) * heads),
        Case("window256", (_window(256),), (0,) * heads),
        Case("sink64_window512", (_sink_window(64, 512),), (0,) * heads),
        Case("per_head", (_causal(), _sink_window(64, 512)), (0,) * half + (1,) * (heads - half)),
        Case("block_causal256", (M.BlockCausal(256),), (0,) * heads),
        Case(
            "tile3d_8x16x32",
            (M.Tile3D((8, 16, 32), (1, 3, 7)),),
            (0,) * heads,
            TilePermutation((8, 16, 32), (2, 4, 8)),
            (8, 16, 32),
        ),
        Case("documents16", (_causal(),), (0,) * heads, documents=16),
    ]


def document_ids(seq: int, n: int, device=None) -> torch.Tensor:
    """``[1, seq]`` ids of ``n`` packed documents of uneven lengths (fixed seed; each at least
    a quarter of ``seq / n``), as a flattening collator packs them."""
    g = torch.Generator().manual_seed(0)
    weights = 0.25 + torch.rand(n, generator=g)
    lengths = (weights / weights.sum() * seq).floor().long()
    lengths[-1] += seq - int(lengths.sum())
    return torch.repeat_interleave(torch.arange(n), lengths).unsqueeze(0).to(device)


class _SdpaDocuments(torch.nn.Module):
    """A model's attention over packed documents: SDPA with the mask built from segment ids."""

    def forward(self, q, k, v, seg):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        mask = (seg[:, None, :, None] == seg[:, None, None, :]) & causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


#: cases whose every mask lies inside causal: the model attends causally (SDPA is_causal)
CAUSAL_CASES = {"causal", "window256", "sink64_window512", "per_head"}


def case_spec(case: Case, block: int) -> dict:
    """The spec that gives ``case`` through ``torch.compile(backend="attncc")``: its first
    program for every head, the others as head overrides, its permutation."""
    rule: dict = {"name": case.name, "mask": case.programs[0].to_spec()}
    for i, prog in enumerate(case.programs[1:], 1):
        heads = [h for h, p in enumerate(case.head_to_program) if p == i]
        rule.setdefault("heads", {})[f"{heads[0]}-{heads[-1]}"] = prog.to_spec()
    if case.permute is not None:
        rule["permute"] = {"grid": list(case.permute.grid), "tile": list(case.permute.tile)}
    return {"attncc": 1, "block_size": block, "rules": [rule]}


class _Sdpa(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class BaselineError(RuntimeError):
    """A baseline was not at its best (recompiled while timed, or ran an unfused fallback)."""


def cpu_templates() -> int:
    """Fused C++ template kernels inductor generated so far (FlexAttention's CPU kernel is one)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cpp_templated_kernel_counter", 0))


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def make_plan(case: Case, seq: int, heads: int, kv_heads: int, dim: int, dtype: str, block: int) -> AttentionPlan:
    return AttentionPlan.of(
        *case.programs,
        head_to_program=case.head_to_program,
        num_heads=heads,
        num_kv_heads=kv_heads,
        q_len=seq,
        head_dim=dim,
        dtype=dtype,
        block=block,
        permute=case.permute,
        rule=case.name,
    )


def _flex_predicate(name: str, heads: int):
    """The case's predicate written as a FlexAttention mask_mod over model positions."""

    def causal(q, k):
        return q >= k

    def window(n):
        return lambda q, k: (q >= k) & (q - k < n)

    def sink_window(sink, n):
        return lambda q, k: (q >= k) & ((k < sink) | (q - k < n))

    def tile3d(grid, w):
        _, gh, gw = grid

        def pred(q, k):
            qt, qh, qw = q // (gh * gw), (q // gw) % gh, q % gw
            kt, kh, kw = k // (gh * gw), (k // gw) % gh, k % gw
            return ((qt - kt).abs() <= w[0]) & ((qh - kh).abs() <= w[1]) & ((qw - kw).abs() <= w[2])

        return pred

    half = heads // 2
    sw = sink_window(64, 512)
    preds = {
        "causal": lambda h, q, k: causal(q, k),
        "window256": lambda h, q, k: window(256)(q, k),
        "sink64_window512": lambda h, q, k: sw(q, k),
        "per_head": lambda h, q, k: torch.where(h < half, causal(q, k), sw(q, k)),
        "block_causal256": lambda h, q, k: k // 256 <= q // 256,
        "tile3d_8x16x32": lambda h, q, k: tile3d((8, 16, 32), (1, 3, 7))(q, k),
    }
    return preds[name]


def flex_mask_mod(case: Case, plan: AttentionPlan, device=None, kernel_order: bool = True, ids=None):
    """FlexAttention mask_mod over *kernel-order* indices (inputs pre-permuted for Flex), or over
    model positions when ``kernel_order`` is False; packed documents: Flex's document mask over
    ``ids`` (causal within each document, as attention-gym writes it)."""
    order = plan.order(device) if kernel_order else None
    if case.documents:
        doc = ids[0]

        def document_mask(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

        return document_mask
    pred = _flex_predicate(case.name, plan.num_heads)

    def mask_mod(b, h, q_idx, kv_idx):
        if order is not None:
            return pred(h, order[q_idx], order[kv_idx])
        return pred(h, q_idx, kv_idx)

    return mask_mod


# -- timing ------------------------------------------------------------------------------------


def interleaved(
    fns: dict, repeats: int, warmup: int = 1, *, warm=(), budget_s: float | None = None, stats: dict | None = None
) -> dict[str, float]:
    """Median seconds per function, calls interleaved so drifting machine load hits all alike.

    ``warm``: names already called once (no warm-up call). ``budget_s``: a function whose
    warm-up took longer than this gets fewer repeats (at least one), so one slow baseline
    cannot eat the run's time. ``stats`` receives per function ``{"min": s, "n": repeats}``."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(f) -> float:
        """Seconds of one call: CUDA events on a GPU (device time, the launch's host work only
        where it stalls the device), the wall clock between synchronisations on CPU."""
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync()
            start.record()
            f()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    first: dict[str, float] = {}
    for _ in range(warmup):
        for k, f in fns.items():
            if k in warm:
                continue
            first[k] = timed(f)
    reps = {
        k: repeats if budget_s is None or k not in first else max(1, min(repeats, int(budget_s / first[k])))
        for k in fns
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, f in fns.items():
            if i >= reps[k]:
                continue
            times[k].append(timed(f))
    if stats is not None:
        stats.update({k: {"min": min(v), "n": len(v)} for k, v in times.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def best_sdpa_backends(q, k, v) -> dict[str, object]:
    """The fastest SDPA backend on this GPU for these inputs, without and with a mask: cuDNN,
    flash and memory-efficient each timed (three calls, CUDA events) where they run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = q.shape[-2]
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    out = {}
    for key, kw, choices in (
        ("plain", {"is_causal": True}, ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")),
        ("masked", {"attn_mask": mask}, ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION")),
    ):
        best = None
        for name in choices:
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, **kw)
                    t = interleaved({name: lambda kw=kw: F.scaled_dot_product_attention(q, k, v, **kw)}, 3)[name]
            except RuntimeError:  # this backend does not take these inputs
                continue
            if best is None or t < best[1]:
                best = (backend, t)
        if best is None:
            raise BaselineError(f"no SDPA backend runs {key} attention for these inputs")
        out[key] = best[0]
    log(f"SDPA backends: {out}")
    return out


def machine_name() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return bench_machine(gpu, torch.get_num_threads())


# -- the matrix --------------------------------------------------------------------------------


def run_case(case: Case, seq: int, args, flex_fn) -> dict:
    from attncc.codegen.executors import run as attncc_run
    from attncc.codegen.forward.reference import attention_reference

    if case.grid is not None:
        seq = case.grid[0] * case.grid[1] * case.grid[2]
    dtype = getattr(torch, args.dtype)
    plan = make_plan(case, seq, args.heads, args.heads, args.dim, args.dtype, args.block)
    dev = args.device
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, seq, args.dim, generator=gen).to(dev, dtype) for _ in range(3))
    ids = None
    if case.documents:
        plan = dataclasses.replace(plan, mask_kind="documents")
        ids = document_ids(seq, case.documents, dev)

    t0 = time.perf_counter()
    table = plan.block_table()
    if ids is not None:
        table = document_table(table, ids[0].cpu(), plan.q_len, plan.q_offset, plan.kv_len)
    t_table = time.perf_counter() - t0
    density = _density(plan, dev) if ids is None else _document_density(ids, seq)
    block_density = (
        table.visited().double() * torch.bincount(torch.tensor(plan.head_to_program)).double()
    ).sum().item() / (args.heads * table.num_q_blocks * table.num_kv_blocks)

    executor = "triton" if dev == "cuda" else "torch"
    t0 = time.perf_counter()
    with torch.no_grad():
        out, _ = attncc_run(plan, q, k, v, ids, executor=executor)
    t_first = time.perf_counter() - t0

    err = None
    if seq <= args.max_ref_seq:
        # one head per mask program: heads of one program differ only in their data
        heads = [plan.head_to_program.index(i) for i in range(len(plan.programs))]
        sub = dataclasses.replace(
            plan, head_to_program=tuple(range(len(heads))), num_heads=len(heads), num_kv_heads=len(heads)
        )
        ref, _ = attention_reference(sub, q[:, heads], k[:, heads], v[:, heads], ids)
        err = (out[:, heads].float() - ref.float()).abs().max().item()
        del ref

    sdpa_backend: dict[str, object] = {}

    def sdpa(**kw):
        if dev != "cuda":
            return F.scaled_dot_product_attention(q, k, v, **kw)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backend["masked" if "attn_mask" in kw else "plain"]):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    if dev == "cuda":
        sdpa_backend.update(best_sdpa_backends(q, k, v))

    # as users call it: the model's SDPA compiled with the case's spec (one graph, strict)
    compiled = torch.compile(
        _SdpaDocuments() if ids is not None else _Sdpa(case.name in CAUSAL_CASES),
        backend="attncc",
        options={"spec": case_spec(case, args.block), "executor": executor, "strict": True, "inner": "eager"},
    )
    model_args = (q, k, v) if ids is None else (q, k, v, ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        cout = compiled(*model_args)
        t_compiled_first = time.perf_counter() - t0
    compiled_err = (cout.float() - out.float()).abs().max().item()
    fns = {
        "attncc": lambda: attncc_run(plan, q, k, v, ids, executor=executor),
        "attncc_compiled": lambda: compiled(*model_args),
        "sdpa_dense": lambda: sdpa(),
    }
    if case.name == "causal" or dev == "cuda":
        fns["sdpa_causal"] = lambda: sdpa(is_causal=True)
    # SDPA with a dense mask skips nothing: its time depends on the shape, not on the mask, so it
    # is measured with the first case of each shape and reused for the others
    shape_key = (seq, args.batch, args.heads, args.dim, args.dtype, dev)
    masked_from = args.masked_seen.get(shape_key)
    if args.masked_sdpa and seq <= args.max_masked_seq and masked_from is None:
        bool_mask = plan.dense_mask(dev).unsqueeze(0)
        if ids is not None:
            bool_mask = bool_mask & same_document(ids, seq, 0)
        fns["sdpa_masked"] = lambda: sdpa(attn_mask=bool_mask)
    flex_err = None
    if flex_fn is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        # model order (as a Flex user writes the mask) unless --flex-order kernel: the permuted
        # order attncc's kernel works in, reached by gathers inside mask_mod
        order = plan.order(dev) if args.flex_order == "kernel" else None
        qf, kf, vf = (x if order is None else x.index_select(2, order) for x in (q, k, v))
        t0 = time.perf_counter()
        bm = create_block_mask(
            flex_mask_mod(case, plan, dev, order is not None, ids),
            1,
            args.heads,
            seq,
            seq,
            device=dev,
            BLOCK_SIZE=args.flex_block,
        )
        t_bm = time.perf_counter() - t0
        t0 = time.perf_counter()
        templates = cpu_templates()
        # the grad mode it is timed in (a guard on it would recompile); no graph cache, so the
        # compile generates its kernels and the fused-template check below sees them
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
            fo = flex_fn(qf, kf, vf, block_mask=bm, scale=plan.scale)
        t_flex_compile = time.perf_counter() - t0
        if dev == "cpu" and cpu_templates() == templates:
            raise BaselineError(f"{case.name} S={seq}: FlexAttention did not take inductor's fused CPU template")
        if order is not None:
            fo = fo.index_select(2, plan.permute.inverse(dev))
        # FlexAttention leaves rows with no key at zero as well
        flex_err = (fo.float() - out.float()).abs().max().item()
        fns["flex"] = lambda: flex_fn(qf, kf, vf, block_mask=bm, scale=plan.scale)
    with torch.no_grad():
        # attncc ran above (warm; Flex's first call compiled, so it gets a timed warm-up that sizes
        # its repeats); dense SDPA is warm after the first case of a shape
        warm = {"attncc", "attncc_compiled"} | (
            {"sdpa_dense", "sdpa_causal"} if shape_key in args.dense_seen else set()
        )
        stats: dict = {}
        before = graphs_compiled()
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = interleaved(fns, args.repeats, warm=warm, budget_s=args.budget, stats=stats)
        fallback = [str(w.message) for w in caught if "without torch.compile" in str(w.message)]
        if graphs_compiled() != before or fallback:
            why = fallback[0] if fallback else f"{graphs_compiled() - before} graph(s) compiled while timing"
            raise BaselineError(f"{case.name} S={seq}: a baseline was not at its best: {why}")
    args.dense_seen.add(shape_key)
    if "sdpa_masked" in t:
        args.masked_seen[shape_key] = (case.name, t["sdpa_masked"], stats["sdpa_masked"])
    elif masked_from is not None:
        t["sdpa_masked"] = masked_from[1]
    row = {
        "case": case.name,
        "seq": seq,
        "heads": args.heads,
        "dim": args.dim,
        "dtype": args.dtype,
        "block": args.block,
        "density": density,
        "block_density": block_density,
        "ideal_speedup": 1 / density if density else math.inf,
        "times_s": t,
        "times_min_s": {k: s["min"] for k, s in stats.items()},
        "repeats": {k: s["n"] for k, s in stats.items()},
        "sdpa_masked_measured_with": masked_from[0] if masked_from is not None else case.name,
        "attncc_first_call_s": t_first,
        "block_table_s": t_table,
        "max_err_vs_reference": err,
        "flex_max_diff_vs_attncc": flex_err,
        "compiled_max_diff_vs_attncc": compiled_err,
        "attncc_compiled_first_call_s": t_compiled_first,
    }
    row["speedup_vs_dense"] = t["sdpa_dense"] / t["attncc"]
    row["fraction_of_ideal"] = row["speedup_vs_dense"] / row["ideal_speedup"]
    if "flex" in t:
        row["attncc_over_flex"] = t["attncc"] / t["flex"]
        row["attncc_compiled_over_flex"] = t["attncc_compiled"] / t["flex"]
        row["flex_block_mask_s"] = t_bm
        row["flex_first_call_s"] = t_flex_compile
    if "sdpa_causal" in t and case.name == "causal":
        row["attncc_over_sdpa_causal"] = t["attncc"] / t["sdpa_causal"]
    if dev == "cuda":
        flops = 4 * args.batch * args.heads * seq * seq * args.dim * block_density
        row["attncc_tflops_on_computed_blocks"] = flops / t["attncc"] / 1e12
    return row


def _document_density(ids: torch.Tensor, seq: int) -> float:
    """Causal pairs within each document over all pairs (closed form from the lengths)."""
    lengths = torch.bincount(ids[0].cpu()).double()
    return float((lengths * (lengths + 1) / 2).sum()) / seq**2


def _density(plan: AttentionPlan, device, rows: int = 2048) -> float:
    """Fraction of allowed (q, kv) pairs over all heads, a band of query rows at a time."""
    allowed = 0
    kv = torch.arange(plan.kv_len, device=device).view(1, 1, -1)
    for h, i in enumerate(plan.head_to_program):
        prog, hh = plan.programs[i], torch.tensor(h, device=device).view(1, 1, 1)
        for r0 in range(0, plan.q_len, rows):
            q = torch.arange(r0, min(plan.q_len, r0 + rows), device=device).view(1, -1, 1) + plan.q_offset
            allowed += int(prog.dense(hh, q, kv, plan.q_len, plan.kv_len).expand(1, q.shape[1], plan.kv_len).sum())
    return allowed / (plan.num_heads * plan.q_len * plan.kv_len)


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    cols = [
        "case",
        "S",
        "attncc ms",
        "compiled ms",
        "flex ms",
        "dense ms",
        "masked ms",
        "density",
        "blk dens",
        "ideal x",
        "x dense",
        "of ideal",
        "/flex",
        "compiled /flex",
        "err",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        t = r["times_s"]
        extra = (
            f" (SDPA causal {t['sdpa_causal'] * 1e3:.1f} ms, ratio {r['attncc_over_sdpa_causal']:.2f})"
            if "attncc_over_sdpa_causal" in r
            else ""
        )
        print(
            "| "
            + " | ".join(
                [
                    r["case"] + extra,
                    str(r["seq"]),
                    f"{t['attncc'] * 1e3:.1f}",
                    f"{t['attncc_compiled'] * 1e3:.1f}",
                    _fmt(t.get("flex", None) and t["flex"] * 1e3, ".1f"),
                    f"{t['sdpa_dense'] * 1e3:.1f}",
                    _fmt(t.get("sdpa_masked", None) and t["sdpa_masked"] * 1e3, ".1f"),
                    f"{r['density']:.4f}",
                    f"{r['block_density']:.4f}",
                    f"{r['ideal_speedup']:.1f}",
                    f"{r['speedup_vs_dense']:.1f}",
                    f"{r['fraction_of_ideal']:.0%}",
                    _fmt(r.get("attncc_over_flex"), ".2f"),
                    _fmt(r.get("attncc_compiled_over_flex"), ".2f"),
                    _fmt(r["max_err_vs_reference"], ".1e"),
                ]
            )
            + " |"
        )


def matrix(args, on_row=None) -> list[dict]:
    flex_fn = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex_fn = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # an older torch without FlexAttention: the column stays empty
            log(f"FlexAttention unavailable ({e}); its column is skipped")
    rows = []
    sel = [c for c in cases(args.heads) if not args.cases or c.name in args.cases]
    todo = [(c, s) for s in args.seqs for c in sel if not (c.grid and s != args.seqs[0])]
    for i, (case, seq) in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {case.name} S={seq} ...")
        t0 = time.perf_counter()
        # a fresh Dynamo state per case: FlexAttention is compiled once for this case's mask_mod,
        # never past the recompile limit into its eager fallback (checked while timing)
        torch._dynamo.reset()
        rows.append(run_case(case, seq, args, flex_fn))
        if on_row is not None:
            on_row(rows)
        r = rows[-1]
        log(
            f"[{i}/{len(todo)}] {case.name} S={r['seq']}: attncc {r['times_s']['attncc'] * 1e3:.1f} ms, "
            f"{r['fraction_of_ideal']:.0%} of ideal, /flex {_fmt(r.get('attncc_over_flex'), '.2f')} "
            f"({time.perf_counter() - t0:.0f}s)"
        )
    return rows


# -- compile overhead --------------------------------------------------------------------------


def compile_overhead(args) -> list[dict] | None:
    try:
        import attncc.backend  # noqa: F401
    except ImportError as e:
        log(f"--compile-overhead skipped: the attncc backend is not importable yet ({e})")
        return None
    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {"attncc": 1, "name": "bench", "block_size": 64, "rules": [{"mask": {"window": 256}}]}
    rows = []
    for layers in (2, 8):
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
            max_position_embeddings=1024,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 1000, (1, 256))
        for backend in ("inductor", "attncc"):
            opts = {"spec": spec} if backend == "attncc" else None
            for phase in ("cold", "warm"):
                torch._dynamo.reset()
                if phase == "cold" and backend == "inductor":
                    torch._inductor.codecache.FxGraphCache.clear() if hasattr(torch._inductor, "codecache") else None
                compiled = torch.compile(model, backend=backend, options=opts)
                t0 = time.perf_counter()
                with torch.no_grad():
                    compiled(ids)
                dt = time.perf_counter() - t0
                rows.append({"layers": layers, "backend": backend, "phase": phase, "compile_s": dt})
                log(f"compile {layers} layers {backend} {phase}: {dt:.1f}s")
    for layers in (2, 8):
        for phase in ("cold", "warm"):
            a = next(r for r in rows if r["layers"] == layers and r["backend"] == "attncc" and r["phase"] == phase)
            b = next(r for r in rows if r["layers"] == layers and r["backend"] == "inductor" and r["phase"] == phase)
            print(
                f"| {layers} layers | {phase} | attncc {a['compile_s']:.1f}s | inductor {b['compile_s']:.1f}s | "
                f"ratio {a['compile_s'] / b['compile_s']:.2f} |"
            )
    return rows


# -- scale -------------------------------------------------------------------------------------


def _scale_cases() -> list[Case]:
    statics = [c for c in cases(1) if c.grid is None and len(c.programs) == 1]
    statics.append(
        Case(
            "tile3d_64x128x128",
            (M.Tile3D((64, 128, 128), (1, 3, 7)),),
            (0,),
            TilePermutation((64, 128, 128), (2, 4, 8)),
            (64, 128, 128),
        )
    )
    return statics


def scale_one(name: str, seq: int) -> dict:
    """Build one block table in this (fresh) process; peak RSS growth over the baseline."""
    import resource

    case = next(c for c in _scale_cases() if c.name == name)
    n = case.grid[0] * case.grid[1] * case.grid[2] if case.grid else seq
    plan = make_plan(case, n, 1, 1, 64, "float32", 128)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    table = plan.block_table()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {
        "case": name,
        "seq": n,
        "block": 128,
        "build_s": dt,
        "peak_rss_growth_mib": peak / 1024,
        "visited_blocks": int(table.visited().sum()),
        "block_density": table.block_density().item(),
    }


def scale(args) -> list[dict]:
    """Block tables at 128k and 1M tokens: time and peak memory (no S x S allowed), one process each."""
    import subprocess

    rows = []
    todo = [(c.name, s) for s in args.scale_seqs for c in _scale_cases() if not (c.grid and s != args.scale_seqs[-1])]
    for i, (name, seq) in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] scale {name} S={seq} ...")
        res = subprocess.run(
            [sys.executable, "-m", "bench.attention", "--scale-one", name, str(seq)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        if res.returncode:
            log(res.stderr[-2000:])
            rows.append({"case": name, "seq": seq, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"| {name} | {row['seq']} | {row['build_s']:.2f}s | {row['peak_rss_growth_mib']:.0f} MiB | "
            f"{row['block_density']:.5f} |",
            flush=True,
        )
    return rows


# -- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S=4096 only, 5 repeats (the default matrix)")
    ap.add_argument("--long", action="store_true", help="also S=8192 and 16384")
    ap.add_argument("--seqs", type=int, nargs="*", default=None)
    ap.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block", type=int, default=64, help="attncc block size (q and kv)")
    ap.add_argument("--flex-block", type=int, default=128)
    ap.add_argument(
        "--flex-order",
        choices=["model", "kernel"],
        default="model",
        help="token order Flex gets for permuted cases: model (as users write it) or attncc's kernel order",
    )
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--budget", type=float, default=8.0, help="a call slower than this many seconds gets fewer repeats (>= 1)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-masked-sdpa", dest="masked_sdpa", action="store_false")
    ap.add_argument("--max-masked-seq", type=int, default=8192, help="masked SDPA (a dense S x S mask) up to here")
    ap.add_argument("--max-ref-seq", type=int, default=4096, help="check against the dense reference up to here")
    ap.add_argument("--json", action="store_true", help="write bench/results/<machine>-<date>.json")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (implies --json)")
    ap.add_argument("--compile-overhead", action="store_true")
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--scale-seqs", type=int, nargs="*", default=[131072, 1048576])
    ap.add_argument("--scale-one", nargs=2, metavar=("CASE", "SEQ"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = ap.parse_args(argv)
    args.dense_seen, args.masked_seen = set(), {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scale_one:
        print(json.dumps(scale_one(args.scale_one[0], int(args.scale_one[1]))))
        return 0
    if args.seqs is None:
        args.seqs = [4096, 8192, 16384] if args.long else [4096]
    if args.repeats is None:
        # medians of 5: on a shared machine a median of 3 still swings with one lucky call
        args.repeats = 5
    result: dict = {
        "machine": machine_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "argv": sys.argv[1:],
        # other work on the machine shifts every column; the load average says how much there was
        "load_avg_at_start": os.getloadavg(),
    }
    path = (args.out or RESULTS / f"{result['machine']}-{result['date']}.json") if args.json or args.out else None

    mode = "compile_overhead" if args.compile_overhead else "scale" if args.scale else None

    def save() -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()) if path.exists() else {}
        if mode is None:
            old.update(result)
        else:
            # a side mode adds its rows (and its own run's argv and load) beside the matrix, whose
            # top-level run description stays as it was
            run = {k: v for k, v in result.items() if k != mode}
            old.update({mode: result.get(mode), f"{mode}_run": run})
        path.write_text(json.dumps(old, indent=1, default=str) + "\n")

    if args.compile_overhead:
        result["compile_overhead"] = compile_overhead(args)
    elif args.scale:
        print("| mask | tokens | build | peak RSS growth | block density |\n|---|---|---|---|---|")
        result["scale"] = scale(args)
        result["note"] = "peak = growth of the max RSS of a fresh process while building the table"
    else:
        key = "matrix" if args.device == "cpu" else f"matrix_{args.device}_{args.dtype}_d{args.dim}"

        def partial(rows):
            result[key] = rows
            save()

        rows = matrix(args, partial)
        print_table(rows)
        result[key] = rows
    result["load_avg_at_end"] = os.getloadavg()
    save()
    if path is not None:
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    sys.exit(main())
