"""Block classification at scale: wall time and peak memory of the block map and the block table
of a long streaming mask, each measured in a fresh subprocess (ru_maxrss is per process).

    python bench/blocks_scale.py [--tokens 131072 1048576] [--block 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MASK = {"all": ["causal", {"any": [{"sink": 128}, {"window": 4096}]}]}


def measure(what: str, tokens: int, block: int) -> dict:
    """Run in this process (the child): baseline RSS after imports, then the work."""
    import torch

    from attncc.blocks import build_block_table, classify
    from attncc.spec import parse_mask

    torch.set_num_threads(1)
    mask = parse_mask(MASK, {})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if what == "classify":
        labels = classify(mask, tokens, tokens, block, block)
        visited = int((labels != 0).sum())
    else:
        table = build_block_table([mask], [0], tokens, tokens, block, block)
        visited = int(table.visited()[0])
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nb = -(-tokens // block)
    return {
        "what": what,
        "tokens": tokens,
        "block": block,
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(peak / 1024, 1),
        "rss_growth_mb": round((peak - base) / 1024, 1),
        "visited_blocks": visited,
        "block_density": round(visited / nb / nb, 5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, metavar=("WHAT", "TOKENS", "BLOCK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        what, tokens, block = args.child
        print(json.dumps(measure(what, int(tokens), int(block))))
        return
    results = []
    print(f"mask {json.dumps(MASK)}, {args.block}x{args.block} blocks, one thread")
    print(f"{'what':>8} {'tokens':>8} {'wall s':>7} {'peak MB':>8} {'growth MB':>9} {'visited':>9} {'density':>8}")
    for tokens in args.tokens:
        for what in ("classify", "table"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", what, str(tokens), str(args.block)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{what:>8} {tokens:>8} {r['wall_s']:>7.2f} {r['peak_rss_mb']:>8.1f} {r['rss_growth_mb']:>9.1f} "
                f"{r['visited_blocks']:>9} {r['block_density']:>8.4f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
