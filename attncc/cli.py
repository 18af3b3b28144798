"""The ``attncc`` command: validate specs, explain what a spec does to a model's attentions, print the schema."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from attncc import draw
from attncc.codegen.dump import write_kernels
from attncc.codegen.files import write_file
from attncc.importers import PatternError, duo_spec, minference_spec, xattention_spec
from attncc.ir.dtypes import DTYPES, SPELLINGS
from attncc.ir.plan import AttentionPlan, PlanDensity, plan_density, ranges
from attncc.ir.selection import selectors_of
from attncc.spec import SiteShape, SpecError, json_schema, load_spec, plan_for


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
    rows: list[list[str]] = []
    # each distinct plan once: its density and the layers that use it (for the picture)
    densities: dict[AttentionPlan, PlanDensity] = {}
    layers_of: dict[AttentionPlan, list[int]] = {}
    try:
        spec = load_spec(args.spec)
        for layer in range(args.layers):
            shape = SiteShape(args.heads, q_len, kv_len, layer, args.module, q_offset=args.q_offset)
            plan = plan_for(spec, shape)
            if plan is None:
                heads = ranges(list(range(args.heads)))
                note = "no rule matches: left to the model's own attention"
                rows.append([str(layer), "-", heads, "1.0000", "-", "-", "-", "-", note])
                continue
            if plan.is_dynamic:
                methods = sorted({f"'{sel.method}'" for p in plan.programs for sel in selectors_of(p)})
                raise spec.error(
                    f"rule '{plan.rule}' selects blocks from the data at run time ({', '.join(methods)}): its density "
                    "depends on the inputs, so it has no static block map",
                    ("rules", spec.match(layer, args.module) or 0, "mask"),
                )
            if plan not in densities:
                densities[plan] = plan_density(plan)
            layers_of.setdefault(plan, []).append(layer)
            for prog in densities[plan].programs:
                density = prog.allowed / (q_len * kv_len)
                visited = f"{prog.visited / prog.blocks:.4f}"
                counts = [str(prog.empty), str(prog.partial), str(prog.full)]
                mask = str(plan.programs[prog.program])
                rows.append([str(layer), plan.rule, ranges(list(prog.heads)), f"{density:.4f}", *counts, visited, mask])
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{spec.name}: q_len {q_len}, kv_len {kv_len}, q_offset {args.q_offset}, {args.heads} heads, "
        f"{args.layers} layers, module '{args.module}'"
    )
    print(_table(rows, ["layer", "rule", "heads", "density", "empty", "partial", "full", "visited", "mask"]))
    if args.png:
        try:
            _draw(args.png, layers_of)
        except ImportError as e:
            print(f"error: --png needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
            return 1
        print(f"block map written to {args.png}")
    return 0


def _draw(path: str, layers_of: dict[AttentionPlan, list[int]]) -> None:
    """One block map per distinct mask program, in kernel (permuted) order."""
    # the distinct (program, blocks, permutation) panels, with the layers and heads drawing them
    panels: dict[tuple, tuple[AttentionPlan, int, set[int], set[int]]] = {}
    for plan, layers in layers_of.items():
        for i, (prog, head) in enumerate(zip(plan.programs, plan.program_heads())):
            key = (prog, head if prog.depends_on_head else 0, plan.block_q, plan.block_kv, plan.permute)
            entry = panels.setdefault(key, (plan, i, set(), set()))
            entry[2].update(layers)
            entry[3].update(plan.heads_of(i))
    drawn = []
    for plan, i, layer_set, heads in list(panels.values())[: draw.PANELS]:
        title = f"layers {ranges(sorted(layer_set))}, heads {ranges(sorted(heads))}\n"
        title += draw.shorten(str(plan.programs[i]), 44)
        if plan.permute is not None:
            title += "\n(tiled order)"
        img, labels = draw.static_image(plan, i)
        drawn.append(draw.Panel(img, labels, title, draw.extent(plan)))
    draw.save(path, drawn)


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def _dump(args: argparse.Namespace) -> int:
    """Write the kernels a spec gives one attention shape: source, printed plan, TTIR/TTGIR/PTX and
    manifest.json (no model needed)."""
    try:
        spec = load_spec(args.spec)
        shape = SiteShape(
            num_heads=args.heads,
            q_len=args.q_len,
            kv_len=args.kv_len,
            layer=args.layer,
            module=args.module,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype=SPELLINGS[args.dtype],
        )
        plan = plan_for(spec, shape)
    except SpecError as e:
        print(f"attncc dump: {e}", file=sys.stderr)
        return 2
    if plan is None:
        print(f"attncc dump: no rule of {args.spec} matches layer {args.layer} module '{args.module}'", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("spec", str(args.spec))
    entries = write_kernels(out, [plan], manifest=manifest, archs=tuple(args.arch), aot=not args.no_aot)
    write_file(manifest_path, json.dumps(manifest, indent=2) + "\n")
    for entry in entries or [k for k in manifest["kernels"] if k["plan_key"] == plan.key()]:
        print(f"{entry['kernel']}: {out / entry['file']}")
        for arch, r in entry["targets"].items():
            if "error" in r:
                print(f"  {arch}: compile failed: {r['error'].splitlines()[0]}")
            else:
                print(f"  {arch}: shared {r['shared_bytes']} B, regs {r.get('num_regs', '?')}")
    print(f"manifest: {manifest_path}")
    return 0


#: ``attncc import FORMAT``: the spec text of the parsed arguments
_IMPORTERS = {
    "duo": lambda a: duo_spec(a.path, threshold=a.threshold, sparsity=a.sparsity, group=a.group, block=a.block),
    "xattention": lambda a: xattention_spec(a.path, stride=a.stride, block=a.block, table=a.table),
    "minference": lambda a: minference_spec(a.path, block=a.block),
}


def _import(args: argparse.Namespace) -> int:
    try:
        text = _IMPORTERS[args.format](args)
    except PatternError as e:
        print(f"attncc import {args.format}: {e}", file=sys.stderr)
        return 2
    if args.output:
        write_file(pathlib.Path(args.output), text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


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

    d = sub.add_parser("dump", help="write the kernels a spec gives one attention shape, and their manifest")
    d.add_argument("spec", help="spec file (YAML)")
    d.add_argument("--q-len", type=int, required=True)
    d.add_argument("--kv-len", type=int, default=None, help="default: --q-len")
    d.add_argument("--heads", type=int, required=True)
    d.add_argument("--kv-heads", type=int, default=None, help="GQA kv heads (default: --heads)")
    d.add_argument("--head-dim", type=int, required=True)
    d.add_argument("--dtype", default="bf16", choices=sorted(s for s, name in SPELLINGS.items() if DTYPES[name].triton))
    d.add_argument("--layer", type=int, default=0)
    d.add_argument("--module", default="")
    d.add_argument("--arch", type=int, nargs="*", default=[90, 80], help="compute capabilities (default 90 80)")
    d.add_argument("--no-aot", action="store_true", help="skip the TTIR/TTGIR/PTX compiles")
    d.add_argument("--out", required=True, help="output folder")
    d.set_defaults(func=_dump)

    imp = sub.add_parser("import", help="print a spec from another project's pattern files")
    isub = imp.add_subparsers(dest="format", required=True)
    duo = isub.add_parser("duo", help="DuoAttention: full_attention_heads.tsv + config.json -> per-layer head policies")
    duo.add_argument("path", metavar="folder", help="pattern folder (full_attention_heads.tsv, config.json)")
    duo.add_argument("--threshold", type=float, default=0.5, help="gate >= threshold: retrieval (full) head")
    duo.add_argument("--sparsity", type=float, default=None, help="instead of --threshold: this quantile of the gates")
    duo.add_argument("--group", type=int, default=1, help="query heads per kv head (GQA)")
    duo.add_argument("--block", type=int, default=64, help="block_size of the spec")
    xat = isub.add_parser("xattention", help="XAttention: per-layer (per-head) thresholds -> threshold rules")
    xat.add_argument("path", metavar="file", help="JSON list (an entry per layer) or a Python file of tables")
    xat.add_argument("--stride", type=int, default=16, help="antidiagonal stride (XAttention: 16, or 8, 4)")
    xat.add_argument("--block", type=int, default=128, help="block size of spec and selection (XAttention: 128)")
    xat.add_argument("--table", default=None, help="the table of a Python file (default: llama_fuse_<stride>)")
    mif = isub.add_parser("minference", help="MInference: best-pattern JSON -> per-layer head policies")
    mif.add_argument("path", metavar="file", help="best-pattern JSON (one object per layer: head -> pattern)")
    mif.add_argument("--block", type=int, default=64, help="block size of the spec and the vertical-slash selection")
    for p_ in (duo, xat, mif):
        p_.add_argument("-o", "--output", default=None, help="write the spec here (default: stdout)")
        p_.set_defaults(func=_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
