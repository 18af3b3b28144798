"""Decode benchmark: per-token attention time over a KV cache at growing contexts, attncc
sink + window vs dense SDPA vs compiled FlexAttention decoding with the same mask.

    python -m bench.decode                 # contexts 2k, 8k, 32k; JSON under bench/results/
    python -m bench.decode --contexts 2048 --repeats 5 --no-json

One decode step: the query of the newest token (B=1, 8 heads on 2 kv heads, D=64; fp32 on CPU,
bf16 on a GPU) against the cache. attncc runs as users call it: a module that writes the new
key and value into a static cache (``index_copy_`` at ``cache_position``) and calls SDPA,
compiled once by ``torch.compile(..., backend="attncc", dynamic=True)`` with the StreamingLLM
spec (4 sinks + a 1024-token causal window), ``strict`` so a site left dense fails the run. Two
attncc columns: ``attncc`` repeats one step at a fixed position (its per-step plan and block
lists cached, as Flex's block mask is), ``attncc_new_step`` puts every call at a new position
of the cache, as generation does (the step's block lists looked up or built per call, shared by
all layers of a model). The cache is one contiguous tensor per context, as a static cache is.
FlexAttention is ``torch.compile(flex_attention)`` with a block mask built once per context for
the same predicate; dense SDPA is eager ``scaled_dot_product_attention`` over the whole cache.

Every baseline must be at its best: a graph compiled past the first call of a context (a
recompile), a Flex call that did not take inductor's fused template, or an output that differs
from fp64 SDPA given the mask explicitly fails the run instead of printing a ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.attention import interleaved, log, machine_name

RESULTS = Path(__file__).parent / "results"
SPEC = {
    "attncc": 1,
    "name": "streaming-llm",
    "block_size": 64,
    "rules": [{"name": "sink-and-window", "mask": {"all": ["causal", {"any": [{"sink": 4}, {"window": 1024}]}]}}],
}
SINK, WINDOW = 4, 1024


class CacheAttention(torch.nn.Module):
    """One decode step's attention over a static cache: write the new key/value at
    ``cache_position``, attend over the cache (Hugging Face's static cache in miniature)."""

    def forward(self, q, k_new, v_new, k_cache, v_cache, cache_position):
        k_cache.index_copy_(2, cache_position, k_new)
        v_cache.index_copy_(2, cache_position, v_new)
        return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)


def allowed_keys(pos: int, n: int) -> torch.Tensor:
    """``[n]`` bool: the keys the query at ``pos`` may attend (causal, sinks or window)."""
    k = torch.arange(n)
    return (k <= pos) & ((k < SINK) | (pos - k < WINDOW))


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class BaselineError(RuntimeError):
    """A baseline was not at its best (recompiled, fell back) or computed something else."""


def run_context(n: int, args, attncc_mod, flex_fn) -> dict:
    dev, dtype = args.device, args.torch_dtype
    gen = torch.Generator().manual_seed(n)
    b, h, hkv, d = 1, args.heads, args.kv_heads, args.dim
    q = torch.randn(b, h, 1, d, generator=gen).to(dev, dtype)
    k_new, v_new = (torch.randn(b, hkv, 1, d, generator=gen).to(dev, dtype) for _ in range(2))
    kc, vc = (torch.randn(b, hkv, n, d, generator=gen).to(dev, dtype) for _ in range(2))
    pos = torch.tensor([n - 1], device=dev)

    with torch.no_grad():
        out = attncc_mod(q, k_new, v_new, kc, vc, pos)
        keep = allowed_keys(n - 1, n).to(dev).view(1, 1, 1, n)
        ref = F.scaled_dot_product_attention(q.double(), kc.double(), vc.double(), attn_mask=keep, enable_gqa=True)
        err = (out.double() - ref).abs().max().item()
        if err > args.tol:
            raise BaselineError(f"attncc differs from fp64 SDPA with the explicit mask by {err:.3g} at context {n}")

        # a new position per call: what generation over a static cache does
        first = max(0, n - 2 - 2 * args.repeats)
        positions = iter([torch.tensor([p], device=dev) for p in range(first, n)])

        def new_step():
            return attncc_mod(q, k_new, v_new, kc, vc, next(positions))

        fns = {
            "attncc": lambda: attncc_mod(q, k_new, v_new, kc, vc, pos),
            "attncc_new_step": new_step,
            "sdpa_dense": lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True),
        }
        flex_stats = {}
        if flex_fn is not None:
            from torch.nn.attention.flex_attention import create_block_mask

            offset = n - 1

            def mask_mod(bb, hh, q_idx, kv_idx):
                qp = q_idx + offset
                return (kv_idx <= qp) & ((kv_idx < SINK) | (qp - kv_idx < WINDOW))

            t0 = time.perf_counter()
            bm = create_block_mask(mask_mod, 1, 1, 1, n, device=dev)
            flex_stats["block_mask_s"] = time.perf_counter() - t0
            before = _cpu_templates()
            t0 = time.perf_counter()
            fo = flex_fn(q, kc, vc, block_mask=bm, enable_gqa=True)
            flex_stats["first_call_s"] = time.perf_counter() - t0
            if dev == "cpu" and _cpu_templates() == before:
                raise BaselineError("compiled FlexAttention did not take inductor's fused CPU template")
            ferr = (fo.double() - ref).abs().max().item()
            if ferr > args.tol:
                raise BaselineError(f"FlexAttention differs from fp64 SDPA by {ferr:.3g} at context {n}")
            fns["flex"] = lambda: flex_fn(q, kc, vc, block_mask=bm, enable_gqa=True)
        g0 = graphs()
        stats: dict = {}
        t = interleaved(fns, args.repeats, warmup=1, stats=stats)
        if graphs() != g0:
            raise BaselineError(f"{graphs() - g0} graph(s) compiled while timing context {n}: a baseline recompiled")
    row = {
        "context": n,
        "times_s": t,
        "times_min_s": {k: s["min"] for k, s in stats.items()},
        "repeats": {k: s["n"] for k, s in stats.items()},
        "kept_keys": int(allowed_keys(n - 1, n).sum()),
        "max_err_vs_fp64": err,
        **({"flex": flex_stats} if flex_stats else {}),
    }
    if "flex" in t:
        row["attncc_over_flex"] = t["attncc"] / t["flex"]
        row["attncc_new_step_over_flex"] = t["attncc_new_step"] / t["flex"]
    row["dense_over_attncc"] = t["sdpa_dense"] / t["attncc"]
    return row


def _cpu_templates() -> int:
    """Fused C++ template kernels inductor generated so far (FlexAttention's CPU kernel is one;
    its graph cache is off in this run, so every compile generates)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cpp_templated_kernel_counter", 0))


def print_table(rows: list[dict]) -> None:
    cols = ["attncc", "attncc_new_step", "sdpa_dense", "flex"]
    print("| context | kept keys | " + " | ".join(f"{c} ms" for c in cols) + " | dense / attncc | attncc / flex |")
    print("|---" * (len(cols) + 4) + "|")
    for r in rows:
        t = r["times_s"]
        cells = [f"{t[c] * 1e3:.3f}" if c in t else "-" for c in cols]
        flex = f"{r['attncc_over_flex']:.2f}" if "attncc_over_flex" in r else "-"
        print(
            f"| {r['context']} | {r['kept_keys']} | "
            + " | ".join(cells)
            + f" | {r['dense_over_attncc']:.2f} | {flex} |"
        )


def summary(rows: list[dict]) -> dict:
    """Growth from the shortest to the longest context of each column (flat: about 1)."""
    first, last = rows[0], rows[-1]
    growth = {k: last["times_s"][k] / first["times_s"][k] for k in first["times_s"] if k in last["times_s"]}
    return {"contexts": [first["context"], last["context"]], "growth": growth}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--executor", default="auto")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.torch_dtype = getattr(torch, args.dtype)
    args.tol = 2e-2 if args.dtype == "bfloat16" else 1e-3 if args.dtype == "float16" else 1e-4
    import attncc  # noqa: F401 - registers the backend

    mod = CacheAttention()
    attncc_mod = torch.compile(
        mod, backend="attncc", dynamic=True, options={"spec": SPEC, "executor": args.executor, "strict": True}
    )
    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_fn = torch.compile(flex_attention, dynamic=False)
    result = {
        "machine": machine_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "argv": sys.argv[1:],
        "load_avg_at_start": os.getloadavg(),
        "shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim, "dtype": args.dtype},
        "spec": SPEC,
        "rows": [],
    }
    path = None if args.no_json else (args.out or RESULTS / f"decode-{result['machine']}-{result['date']}.json")
    # every compile generates its kernels (no graph cache), so the fused-template check sees them
    with torch._inductor.config.patch(fx_graph_cache=False):
        for n in args.contexts:
            log(f"context {n} ...")
            result["rows"].append(run_context(n, args, attncc_mod, flex_fn))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["attncc_graphs"] = graphs()
    result["summary"] = summary(result["rows"])
    print_table(result["rows"])
    print("growth from the shortest to the longest context:", json.dumps(result["summary"]["growth"]))
    if path is not None:
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
