"""Training-step attention benchmark: forward + backward of attncc vs compiled FlexAttention (and
masked SDPA) with the same mask.

    python -m bench.train                  # CPU: S=1024 and 2048, H=4, D=64, fp32
    python -m bench.train --seq 4096 --json

Each implementation computes out = attention(q, k, v), then out.backward(dout). Calls are
interleaved per repeat after a warm-up and the median is reported; only the ratios between
columns measured in the same run mean anything. On CUDA attncc runs its generated Triton
kernels (forward and backward); on CPU its ``torch`` executor.

FlexAttention has no backward on CPU (torch raises "FlexAttention does not support backward on
CPU"), so on CPU the forward+backward anchor is SDPA with the materialised boolean mask, and
Flex is compared on the forward alone (``*_fwd`` columns, run under ``no_grad``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F

from attncc.runtime.ops import attention
from bench.attention import RESULTS, Case, cases, flex_mask_mod, interleaved, log, machine_name, make_plan

CASES = ("causal", "window256", "sink64_window512", "per_head")


def fwd_bwd(fn, leaves, dout):
    """One training-step attention: forward, then backward of ``dout``; gradients are reset."""

    def step():
        for t in leaves:
            t.grad = None
        fn().backward(dout)

    return step


def run_case(case: Case, seq: int, args, flex_fn) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask

    dev, dtype = args.device, getattr(torch, args.dtype)
    plan = make_plan(case, seq, args.heads, args.heads, args.dim, args.dtype, args.block)
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(args.batch, args.heads, seq, args.dim, generator=gen).to(dev, dtype) for _ in range(4))
    executor = "triton" if dev == "cuda" else "torch"
    block_mask = create_block_mask(
        flex_mask_mod(case, plan, dev), 1, args.heads, seq, seq, device=dev, BLOCK_SIZE=args.flex_block
    )
    allowed = plan.dense_mask(dev).unsqueeze(0)

    def attncc_fn(a, b, c):
        return attention(plan, a, b, c, executor=executor)

    def flex(a, b, c):
        return flex_fn(a, b, c, block_mask=block_mask, scale=plan.scale)

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=allowed, scale=plan.scale)

    impls = {"attncc": attncc_fn, "sdpa_masked": sdpa}
    if dev != "cpu":
        impls["flex"] = flex
    leaves = {name: [t.clone().requires_grad_(True) for t in (q, k, v)] for name in impls}
    fns = {name: fwd_bwd(lambda f=f, ls=leaves[name]: f(*ls), leaves[name], dout) for name, f in impls.items()}
    times = interleaved(fns, args.repeats, warmup=1)
    anchor = "flex" if "flex" in impls else "sdpa_masked"
    # the last timed call of each left its gradients in .grad
    grad_diff = max(
        (a.grad.float() - b.grad.float()).abs().max().item() for a, b in zip(leaves["attncc"], leaves[anchor])
    )
    with torch.no_grad():
        fwd = interleaved({"attncc_fwd": lambda: attncc_fn(q, k, v), "flex_fwd": lambda: flex(q, k, v)}, args.repeats)
    times.update(fwd)
    row = {
        "case": case.name,
        "seq": seq,
        "heads": args.heads,
        "dim": args.dim,
        "dtype": args.dtype,
        "block": args.block,
        "device": dev,
        "executor": executor,
        "times_s": times,
        "fwd_bwd_anchor": anchor,
        "attncc_over_anchor": times["attncc"] / times[anchor],
        "max_grad_diff_vs_anchor": grad_diff,
        "attncc_fwd_over_flex_fwd": times["attncc_fwd"] / times["flex_fwd"],
    }
    if "flex" in times:
        row["attncc_over_flex"] = times["attncc"] / times["flex"]
    return row


def print_table(rows: list[dict]) -> None:
    cols = ["attncc", "flex", "sdpa_masked", "attncc_fwd", "flex_fwd"]
    print(
        f"{'case':<18}{'seq':>6}"
        + "".join(f"{c + ' ms':>15}" for c in cols)
        + f"{'fwd+bwd ratio':>20}{'fwd vs flex':>13}{'grad diff':>11}"
    )
    for r in rows:
        t = r["times_s"]
        cells = "".join(f"{t[c] * 1e3:>15.1f}" if c in t else f"{'n/a':>15}" for c in cols)
        ratio = f"{r['attncc_over_anchor']:.2f} vs {r['fwd_bwd_anchor'].split('_')[0]}"
        print(
            f"{r['case']:<18}{r['seq']:>6}{cells}{ratio:>20}{r['attncc_fwd_over_flex_fwd']:>13.2f}"
            f"{r['max_grad_diff_vs_anchor']:>11.1e}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--case", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--block", type=int, default=64, help="attncc block size")
    p.add_argument("--flex-block", type=int, default=128, help="FlexAttention BLOCK_SIZE")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="write bench/results/train-<machine>-<date>.json")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    from torch.nn.attention.flex_attention import flex_attention

    flex_fn = torch.compile(flex_attention, dynamic=False)
    by_name = {c.name: c for c in cases(args.heads)}
    rows = []
    for seq in args.seq:
        for name in args.case:
            log(f"{name} S={seq} ...")
            rows.append(run_case(by_name[name], seq, args, flex_fn))
    print(
        f"forward+backward, {machine_name()}, B={args.batch} H={args.heads} D={args.dim} {args.dtype}, "
        f"median of {args.repeats}; ratio = attncc time / anchor time (lower is better)"
    )
    print_table(rows)
    if args.json:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"train-{machine_name()}-{datetime.date.today()}.json"
        path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
