"""Block classification at scale: wall time and peak memory of the block map, the block table and
the exact allowed-pair count (what ``explain`` reports) for every static structured mask at 128k
and 1M tokens, and of a 3D tile window on a 32k-token video grid with and without its permutation.
Each measurement runs in a fresh subprocess (ru_maxrss is per process); growth is measured over
the RSS after imports, one thread.

    python -m bench.blocks_scale [--tokens 131072 1048576] [--block 64] [--masks causal power]
                                [--what map table count] [--json [PATH]]

``--json`` without a path writes bench/results/blocks-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine_name

RESULTS = Path(__file__).resolve().parent / "results"

#: name -> mask spec; every static structured primitive, as the ready specs use them
MASKS: dict[str, object] = {
    "causal": "causal",
    "window": {"window": 4096},
    "sink_window": {"all": ["causal", {"any": [{"sink": 128}, {"window": 4096}]}]},
    "block_causal": {"block_causal": 4096},
    "chunk": {"chunk": 4096},
    "global": {"any": [{"global": 256}, {"window": {"before": 2048, "after": 2048}}]},
    "strided": {"all": ["causal", {"any": [{"window": 128}, {"strided": 128}]}]},
    "power": {"power": 64},
}
#: 3D video grid of 32768 tokens: 8 frames of 64 x 64, a 3 x 9 x 9 neighbourhood, 2 x 4 x 8 tiles
TILE3D = {"tile3d": {"grid": [8, 64, 64], "window": [1, 4, 4]}}
TILE3D_PERMUTE = {"grid": [8, 64, 64], "tile": [2, 4, 8]}


def measure(name: str, what: str, tokens: int, block: int) -> dict:
    """Run in this process (the child): baseline RSS after imports, then the work."""
    import torch

    from attncc.ir.blocks import build_block_table, classify, count_allowed
    from attncc.ir.permute import TilePermutation
    from attncc.spec import parse_mask

    torch.set_num_threads(1)
    order = None
    if name.startswith("tile3d"):
        mask = parse_mask(TILE3D, {})
        if name == "tile3d_permuted":
            order = TilePermutation(tuple(TILE3D_PERMUTE["grid"]), tuple(TILE3D_PERMUTE["tile"])).index()
    else:
        mask = parse_mask(MASKS[name], {})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    allowed = None
    if what == "map":
        labels = classify(mask, tokens, tokens, block, block, q_order=order, kv_order=order)
        wall = time.perf_counter() - start
        visited, nbytes = int(torch.count_nonzero(labels)), labels.numel()
    elif what == "table":
        table = build_block_table([mask], [0], tokens, tokens, block, block, order, order)
        wall = time.perf_counter() - start
        visited = int(table.visited()[0])
        nbytes = sum(t.numel() * t.element_size() for t in (table.kv_indices, table.full_indices))
    else:
        allowed, counts = count_allowed(mask, tokens, tokens, block, block, q_order=order, kv_order=order)
        wall = time.perf_counter() - start
        visited, nbytes = int(counts[1] + counts[2]), 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nb = -(-tokens // block)
    return {
        "mask": name,
        "spec": TILE3D if name.startswith("tile3d") else MASKS[name],
        "permute": TILE3D_PERMUTE if order is not None else None,
        "what": what,
        "tokens": tokens,
        "block": block,
        "wall_s": round(wall, 3),
        "rss_growth_mb": round((peak - base) / 1024, 1),
        "output_mb": round(nbytes / 2**20, 1),
        "visited_blocks": visited,
        "block_density": round(visited / nb / nb, 5),
        "token_density": None if allowed is None else round(allowed / tokens / tokens, 6),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--masks", nargs="+", default=[*MASKS, "tile3d", "tile3d_permuted"])
    p.add_argument("--what", nargs="+", default=["map", "table", "count"], choices=["map", "table", "count"])
    p.add_argument("--json", nargs="?", const="", default=None, help="write results (default path under bench/results)")
    p.add_argument("--child", nargs=4, metavar=("MASK", "WHAT", "TOKENS", "BLOCK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, what, tokens, block = args.child
        print(json.dumps(measure(name, what, int(tokens), int(block))))
        return
    runs = []
    for name in args.masks:
        # the video grid has a fixed size
        sizes = [32768] if name.startswith("tile3d") else args.tokens
        runs += [(name, what, tokens) for tokens in sizes for what in args.what]
    print(f"{args.block}x{args.block} blocks, one thread; growth = peak RSS over the RSS after imports")
    header = f"{'mask':<16} {'what':>5} {'tokens':>8} {'wall s':>7} {'growth MB':>9} {'out MB':>7} {'blocks':>8}"
    print(header)
    results = []
    for name, what, tokens in runs:
        done = subprocess.run(
            # as a module: run as a script, bench/selectors.py would shadow the standard library's
            [sys.executable, "-m", "bench.blocks_scale", "--child", name, what, str(tokens), str(args.block)],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{name:<16} {what:>5} {tokens:>8} failed: {done.stderr.strip().splitlines()[-1:]}")
            results.append({"mask": name, "what": what, "tokens": tokens, "error": done.stderr[-2000:]})
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{name:<16} {what:>5} {tokens:>8} {r['wall_s']:>7.2f} {r['rss_growth_mb']:>9.1f} {r['output_mb']:>7.1f} "
            f"{r['block_density']:>8.4f}"
        )
    if args.json is not None:
        date = datetime.date.today().isoformat()
        path = Path(args.json) if args.json else RESULTS / f"blocks-{machine_name(threads=1)}-{date}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"machine": machine_name(threads=1), "date": date, "block": args.block, "results": results}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
