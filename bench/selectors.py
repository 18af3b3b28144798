"""Estimator cost and density of block selectors on structured synthetic inputs.

Reports, per selector, the estimation time (features + block logits + selection) as a fraction
of dense attention time (SDPA) measured side by side in one run, and the block density reached.
Inputs: random q/k plus a few "hot" key blocks every query strongly attends to, so a threshold
selector has a small set to find. Writes JSON with ``--out``.

    python -m bench.selectors --seq 2048 --heads 4 --backend torch
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attncc.codegen.selectors import layout as SL
from attncc.codegen.selectors import run as S
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan


def structured_inputs(b, h, s, d, block, hot=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, h, s, d, generator=g)
    direction = torch.randn(d, generator=g)
    q += 2.0 * direction
    nb = s // block
    for j in torch.randperm(nb, generator=g)[:hot].tolist():
        k[:, :, j * block : (j + 1) * block] += 2.0 * direction
    return q, k, torch.randn(b, h, s, d, generator=g)


def _time(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--backend", default="cuda" if torch.cuda.is_available() else "torch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dev = "cuda" if args.backend == "cuda" else "cpu"
    q, k, v = (t.to(dev) for t in structured_inputs(1, args.heads, args.seq, args.dim, args.block))
    dense_t = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), args.reps)
    rows = []
    for score, extra in (("mean_pool", {}), ("antidiagonal", {"stride": 8}), ("draft", {"pool": 16})):
        sel = M.Selector("threshold", tuple(sorted({"tau": args.tau, "score": score, **extra}.items())))
        prog = M.All((M.Causal(), sel))
        plan = AttentionPlan(
            (prog,),
            (0,) * args.heads,
            args.heads,
            args.heads,
            args.seq,
            args.seq,
            args.dim,
            args.dim,
            "float32",
            args.dim**-0.5,
            args.block,
            args.block,
        )
        SL.layout(plan)
        target = None if args.backend == "torch" else args.backend
        est_t = _time(lambda p=plan, t=target: S.select_blocks(p, q, k, t), args.reps)
        selected = S.select_blocks(plan, q, k, target)
        cand = SL.layout(plan).candidates[0].to(dev)
        density = float(selected.sum() / (cand.sum() * args.heads))
        rows.append(
            {
                "score": score,
                "tau": args.tau,
                "estimator_s": est_t,
                "dense_attention_s": dense_t,
                "estimator_fraction": est_t / dense_t,
                "block_density_of_causal": density,
            }
        )
        print(
            f"{score:13s} tau {args.tau}: estimator {est_t * 1e3:8.2f} ms = {est_t / dense_t:6.1%} of dense "
            f"attention ({dense_t * 1e3:.2f} ms), density {density:.3f} of the causal blocks"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seq": args.seq, "heads": args.heads, "backend": args.backend, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
