"""The ``attncc`` command: validate specs, explain what a spec does to a model's attentions, print the schema."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from attncc import masks as M
from attncc.blocks import EMPTY, FULL, PARTIAL, classify, count_allowed
from attncc.permute import TilePermutation
from attncc.plan import _ranges
from attncc.spec import Spec, SpecError, check_executable, json_schema, load_spec

#: token-level detail is drawn in --png pictures up to this many (q, kv) pairs
_PNG_TOKEN_PAIRS = 1024 * 1024
#: at most this many block maps in one picture
_PNG_PANELS = 8


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({spec.name}: {len(spec.rules)} rule{'s' * (len(spec.rules) != 1)})")
    return 1 if failed else 0


@dataclass(frozen=True)
class _Group:
    """Heads of one layer that share a mask program (one row of the explain table)."""

    layer: int
    rule_index: int
    rule: str
    heads: tuple[int, ...]
    mask: M.Mask
    head: int  # the head evaluated (matters for head-dependent masks only)
    block_q: int
    block_kv: int
    permute: TilePermutation | None


@dataclass(frozen=True)
class _Stats:
    density: float
    empty: int
    partial: int
    full: int

    @property
    def visited(self) -> float:
        total = self.empty + self.partial + self.full
        return (self.partial + self.full) / total if total else 0.0


def _groups(spec: Spec, layer: int, module: str, num_heads: int) -> tuple[str, list[_Group]]:
    """(rule name or a note, head groups) of one layer; raises SpecError for what cannot run."""
    i = spec.match(layer, module)
    if i is None:
        return "-", []
    check_executable(spec, i)
    programs, index = spec.head_policy(i, num_heads)
    block_q, block_kv = spec.block_sizes(i)
    perm = spec.permutation(i)
    groups = []
    for p_i, prog in enumerate(programs):
        heads = tuple(h for h, j in enumerate(index) if j == p_i)
        split = [(h,) for h in heads] if prog.depends_on_head else [heads]
        for hs in split:
            groups.append(_Group(layer, i, spec.rule_name(i), hs, prog, hs[0], block_q, block_kv, perm))
    return spec.rule_name(i), groups


def _order(group: _Group) -> torch.Tensor | None:
    return None if group.permute is None else group.permute.index()


def _stats(group: _Group, q_len: int, kv_len: int, q_offset: int) -> _Stats:
    order = _order(group)
    allowed, counts = count_allowed(
        group.mask, q_len, kv_len, group.block_q, group.block_kv, group.head, order, order, q_offset
    )
    return _Stats(allowed / (q_len * kv_len), int(counts[EMPTY]), int(counts[PARTIAL]), int(counts[FULL]))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if c in (0, 3, 4, 5, 6, 7) else '<'}{w}}}" for c, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _explain(args: argparse.Namespace) -> int:
    q_len, kv_len = args.q_len, args.kv_len if args.kv_len is not None else args.q_len
    for name, v, low in (
        ("--q-len", q_len, 1),
        ("--kv-len", kv_len, 1),
        ("--heads", args.heads, 1),
        ("--layers", args.layers, 1),
        ("--q-offset", args.q_offset, 0),
    ):
        if v < low:
            print(f"error: {name} must be >= {low}, got {v}", file=sys.stderr)
            return 2
    try:
        spec = load_spec(args.spec)
        rows: list[list[str]] = []
        drawn: dict[tuple, list[_Group]] = {}
        cache: dict[tuple, _Stats] = {}
        for layer in range(args.layers):
            rule, groups = _groups(spec, layer, args.module, args.heads)
            if not groups:
                rows.append(
                    [
                        str(layer),
                        "-",
                        _ranges(list(range(args.heads))),
                        "1.0000",
                        "-",
                        "-",
                        "-",
                        "-",
                        "no rule matches: left to the model's own attention",
                    ]
                )
                continue
            for g in groups:
                key = (g.mask, g.head if g.mask.depends_on_head else 0, g.block_q, g.block_kv, g.permute)
                if key not in cache:
                    if g.permute is not None:
                        try:
                            g.permute.check(q_len, "query")
                            g.permute.check(kv_len, "key")
                        except M.MaskError as e:
                            raise spec.error(e.message, ("rules", g.rule_index, "permute")) from None
                    try:
                        cache[key] = _stats(g, q_len, kv_len, args.q_offset)
                    except M.MaskError as e:
                        raise spec.error(e.message, ("rules", g.rule_index, "mask")) from None
                st = cache[key]
                drawn.setdefault(key, []).append(g)
                rows.append(
                    [
                        str(layer),
                        rule,
                        _ranges(list(g.heads)),
                        f"{st.density:.4f}",
                        str(st.empty),
                        str(st.partial),
                        str(st.full),
                        f"{st.visited:.4f}",
                        str(g.mask),
                    ]
                )
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{spec.name}: q_len {q_len}, kv_len {kv_len}, q_offset {args.q_offset}, {args.heads} heads, "
        f"{args.layers} layers, module '{args.module}'"
    )
    print(_table(rows, ["layer", "rule", "heads", "density", "empty", "partial", "full", "visited", "mask"]))
    if args.png:
        _draw(args.png, list(drawn.values()), q_len, kv_len, args.q_offset)
        print(f"block map written to {args.png}")
    return 0


def _draw(path: str, panels: list[list[_Group]], q_len: int, kv_len: int, q_offset: int) -> None:
    """One block map per distinct mask program, in kernel (permuted) order: white empty, orange
    partial (allowed tokens darker when small enough to see), blue full."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels[:_PNG_PANELS]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    colors = {EMPTY: (1.0, 1.0, 1.0), PARTIAL: (0.99, 0.82, 0.6), FULL: (0.25, 0.45, 0.8)}
    for ax in axes.flat:
        ax.axis("off")
    for ax, groups in zip(axes.flat, panels):
        g = groups[0]
        order = _order(g)
        labels = classify(g.mask, q_len, kv_len, g.block_q, g.block_kv, g.head, order, order, q_offset)
        if q_len * kv_len <= _PNG_TOKEN_PAIRS:
            tokens = labels.repeat_interleave(g.block_q, 0).repeat_interleave(g.block_kv, 1)[:q_len, :kv_len]
            image = torch.tensor([colors[c] for c in (EMPTY, PARTIAL, FULL)])[tokens.long()]
            allowed = M.dense(g.mask, q_len, kv_len, heads=[g.head], q_offset=q_offset)[0]
            if order is not None:
                allowed = allowed[order][:, order]
            image[(tokens == PARTIAL) & allowed] = torch.tensor((0.85, 0.4, 0.05))
            extent = None
        else:
            image = torch.tensor([colors[c] for c in (EMPTY, PARTIAL, FULL)])[labels.long()]
            extent = (0, kv_len, q_len, 0)
        ax.imshow(image.numpy(), interpolation="nearest", extent=extent)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        layers = _ranges(sorted({x.layer for x in groups}))
        heads = _ranges(sorted({h for x in groups for h in x.heads}))
        title = f"layers {layers}, heads {heads}\n{_shorten(str(g.mask), 44)}"
        if g.permute is not None:
            title += "\n(tiled order)"
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def _dump(args: argparse.Namespace) -> int:
    # the dump writer lives with the code generator; it is optional for the other commands
    try:
        from attncc.codegen import dump as dump_module
    except ImportError as e:
        print(
            f"error: 'attncc dump' needs attncc.codegen.dump, which is not available in this install ({e})",
            file=sys.stderr,
        )
        return 1
    if not hasattr(dump_module, "main"):
        print("error: attncc.codegen.dump has no main(argv) entry point", file=sys.stderr)
        return 1
    return int(dump_module.main(args.dump_args) or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncc", description="attncc: a compiler for sparse attention")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check spec files; exit 1 if any is invalid")
    v.add_argument("specs", nargs="+", metavar="SPEC")
    v.set_defaults(func=_validate)

    e = sub.add_parser("explain", help="per-layer/per-head rule, density and block counts of a spec")
    e.add_argument("spec", metavar="SPEC", help="spec file (or inline YAML)")
    e.add_argument("--q-len", type=int, required=True)
    e.add_argument("--kv-len", type=int, default=None, help="defaults to --q-len")
    e.add_argument("--q-offset", type=int, default=0, help="position of the first query (e.g. kv_len - q_len)")
    e.add_argument("--heads", type=int, required=True)
    e.add_argument("--layers", type=int, required=True)
    e.add_argument("--module", default="", help="module path the rules' `where.module` globs are matched against")
    e.add_argument("--png", default=None, metavar="FILE", help="draw the block maps into a PNG")
    e.set_defaults(func=_explain)

    s = sub.add_parser("schema", help="print the JSON schema of spec format v1")
    s.set_defaults(func=_schema)

    d = sub.add_parser("dump", help="write generated kernels and plans of a model (see attncc.codegen.dump)")
    d.add_argument("dump_args", nargs=argparse.REMAINDER)
    d.set_defaults(func=_dump)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
