"""Host work of a forward launch: Python time per ``attention_fwd`` call up to the kernel launch,
with the kernel replaced by a no-op (so it runs on CPU, and on a GPU measures attncc's part
alone, not Triton's launcher or the kernel).

    python -m bench.host            # sink 64 + window 512, S=4096, B1 H8 D64 bf16; medians of 5 x 2000 calls

Prints microseconds per call (median and spread of the five rounds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attncc.codegen.cache import KernelCache, default_cache
from attncc.codegen.forward.launch import attention_fwd
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan


class _NoopKernel:
    def __init__(self, kernel):
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class NoopCache(KernelCache):
    """The real kernel's signature; launching it does nothing."""

    def kernel(self, plan, target):
        return _NoopKernel(super().kernel(plan, "cuda"))


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    mask = M.All((M.Causal(), M.Any_((M.Sink(64), M.Window(511, 0)))))
    plan = AttentionPlan.of(mask, num_heads=8, q_len=4096, head_dim=64, dtype="bfloat16")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 8, 4096, 64, dtype=torch.bfloat16, device=dev)
    cache = NoopCache(default_cache().root)
    for _ in range(20):
        attention_fwd(plan, q, q, q, target="cuda", arch=90, cache=cache)
    rounds = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.calls):
            attention_fwd(plan, q, q, q, target="cuda", arch=90, cache=cache)
        rounds.append((time.perf_counter() - t) / args.calls * 1e6)
    med = statistics.median(rounds)
    print(f"forward launch host work: {med:.1f} us/call (rounds {min(rounds):.1f}-{max(rounds):.1f}) on {dev}")
    return rounds


if __name__ == "__main__":
    main()
