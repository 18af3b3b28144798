"""Kernel dump: each plan's generated ``.py`` source, its printed plan, TTIR/TTGIR/PTX per GPU
target (compiled ahead of time, no GPU needed) and manifest entries; plus ``attncc dump``."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys

from attncc.codegen.cache import KernelCache, default_cache
from attncc.codegen.generate import kernel_name

from attncc.plan import AttentionPlan, DTypeName

#: largest q_len * kv_len for which per-head token density is computed from the dense mask
_DENSE_LIMIT = 1 << 24


def head_densities(plan: AttentionPlan) -> list[float] | None:
    """Fraction of allowed (q, kv) pairs per head from the plan's structural mask, or None
    when the sequence is too long to evaluate densely (block density is always reported)."""
    if plan.q_len * plan.kv_len > _DENSE_LIMIT:
        return None
    dense = plan.dense_mask()
    return [round(float(x), 6) for x in dense.flatten(1).double().mean(1)]


def block_counts(plan: AttentionPlan) -> dict:
    """Per mask program: partial, full and visited (q block, kv block) pairs out of the total."""
    table = plan.block_table()
    total = table.num_q_blocks * table.num_kv_blocks
    return {
        "num_q_blocks": table.num_q_blocks,
        "num_kv_blocks": table.num_kv_blocks,
        "per_program": [
            {
                "partial": int(p),
                "full": int(f),
                "visited": int(p + f),
                "total": total,
                "block_density": round((int(p) + int(f)) / total, 6),
            }
            for p, f in zip(table.kv_num_blocks.long().sum(1), table.full_num_blocks.long().sum(1))
        ],
    }


def write_kernels(
    folder: str | os.PathLike,
    plans: list[AttentionPlan],
    *,
    manifest: dict | None = None,
    archs: tuple[int, ...] = (90, 80),
    aot: bool = True,
    cache: KernelCache | None = None,
    backward: bool = True,
) -> list[dict]:
    """Write every plan's kernel into ``folder`` and return one manifest entry per plan.

    Files: ``<kernel>_<key>.py`` (the source Triton runs), ``<kernel>_<key>.plan.txt`` (the printed
    plan) and, when ``aot``, ``<kernel>_<key>/sm_<arch>/<kernel>.{ttir,ttgir,ptx,cubin}``. Entries
    hold the kernel file, block sizes, per-head density, block counts and per-target shared memory
    and registers (or the compile error). When ``manifest`` is given its ``"kernels"`` list is
    extended (plans already in it, by key, are not repeated). With ``backward``, each entry's
    ``"backward"`` holds the plan's backward kernels (source, and sm_90 IR when ``aot``), or the
    reason the plan has none (data-dependent selection).
    """
    cache = cache or default_cache()
    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    seen = {e["plan_key"] for e in (manifest or {}).get("kernels", [])}
    unique: list[AttentionPlan] = []
    runs_for: dict[str, str] = {}
    for p in _kernel_plans(plans, runs_for):
        if p.key() not in seen:
            seen.add(p.key())
            unique.append(p)
    entries = []
    for plan in unique:
        src = cache.source(plan)
        shutil.copyfile(src, out / src.name)
        (out / f"{src.stem}.plan.txt").write_text(plan.describe() + "\n")
        entries.append(
            {
                "kernel": kernel_name(plan),
                "file": src.name,
                "plan_file": f"{src.stem}.plan.txt",
                "plan_key": plan.key(),
                "rule": plan.rule,
                "pattern": plan.pattern,
                "plan": plan.to_dict(),
                "block_q": plan.block_q,
                "block_kv": plan.block_kv,
                "head_density": head_densities(plan),
                "blocks": block_counts(plan),
                "targets": {},
            }
        )
        if plan.key() in runs_for:
            entries[-1]["runs_for"] = runs_for[plan.key()]
    if aot and unique:
        from attncc.codegen.aot import compile_plans

        results = compile_plans(unique, out, archs, cache)
        for entry, per_arch in zip(entries, results):
            for r in per_arch:
                r["files"] = {k: os.path.relpath(v, out) for k, v in r.get("files", {}).items()}
                entry["targets"][r.pop("arch")] = r
    if backward and unique:
        _write_backward(out, unique, entries, aot)
    if manifest is not None:
        manifest.setdefault("kernels", []).extend(entries)
    return entries


def _kernel_plans(plans: list[AttentionPlan], runs_for: dict[str, str]) -> list[AttentionPlan]:
    """The static plans whose kernels actually run: a plan with run-time block selection runs
    the forward kernel of two static plans (selected blocks, the rest) over run-time tables."""
    from attncc.codegen.selectors import is_dynamic, layout

    out: list[AttentionPlan] = []
    for p in plans:
        if not is_dynamic(p):
            out.append(p)
            continue
        lay = layout(p)
        for part, role in ((lay.plan_sel, "selected blocks"), (lay.plan_not, "unselected blocks")):
            runs_for[part.key()] = f"{role} of dynamic plan {p.key()} (rule {p.rule or '-'})"
            out.append(part)
    return out


def _write_backward(out: pathlib.Path, plans: list[AttentionPlan], entries: list[dict], aot: bool) -> None:
    """Attach each plan's backward kernels (dQ, dK/dV) to its manifest entry."""
    from attncc.codegen.backward import write_backward_kernels

    static = [(p, e) for p, e in zip(plans, entries) if "runs_for" not in e]
    for e in entries:
        if "runs_for" in e:
            e["backward"] = {"error": "no backward kernels: the plan selects blocks from the data at run time"}
    if not static:
        return
    written = write_backward_kernels(out, [p for p, _ in static], archs=(90,), aot=aot)
    by_key = {w["plan_key"]: w for w in written}
    for p, e in static:
        e["backward"] = by_key[p.key()]


_DTYPES: dict[str, DTypeName] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def plan_from_spec(
    spec_src,
    q_len: int,
    heads: int,
    head_dim: int,
    dtype: str,
    kv_len: int | None = None,
    kv_heads: int | None = None,
    layer: int = 0,
    module: str = "",
    q_offset: int = 0,
) -> AttentionPlan:
    """The plan a spec gives one attention of these shapes (no model needed)."""
    from attncc.spec import load_spec, resolve

    spec = load_spec(spec_src)
    policy = resolve(spec, layer, module, heads)
    if policy is None:
        raise ValueError(f"no rule of {spec_src} matches layer {layer} module '{module}'; nothing to generate")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; expected one of {', '.join(_DTYPES)}")
    return AttentionPlan(
        programs=policy.programs,
        head_to_program=policy.head_to_program,
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        q_len=q_len,
        kv_len=kv_len or q_len,
        head_dim=head_dim,
        head_dim_v=head_dim,
        dtype=_DTYPES[dtype],
        scale=head_dim**-0.5,
        block_q=policy.block_q,
        block_kv=policy.block_kv,
        permute=policy.permute,
        q_offset=q_offset,
        rule=policy.rule,
    )


def main(argv: list[str] | None = None) -> int:
    """``attncc dump SPEC --q-len N --heads H --head-dim D --dtype bf16 --out DIR``."""
    ap = argparse.ArgumentParser(
        prog="attncc dump",
        description="Generate and dump the kernel a spec gives one "
        "attention shape: source, printed plan, TTIR/TTGIR/PTX and manifest.json.",
    )
    ap.add_argument("spec", help="spec file (YAML)")
    ap.add_argument("--q-len", type=int, required=True)
    ap.add_argument("--kv-len", type=int, default=None, help="default: --q-len")
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, default=None, help="GQA kv heads (default: --heads)")
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--module", default="")
    ap.add_argument("--arch", type=int, nargs="*", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--no-aot", action="store_true", help="skip the TTIR/TTGIR/PTX compiles")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    from attncc.spec import SpecError

    try:
        plan = plan_from_spec(
            args.spec,
            args.q_len,
            args.heads,
            args.head_dim,
            args.dtype,
            args.kv_len,
            args.kv_heads,
            args.layer,
            args.module,
        )
    except (SpecError, ValueError) as e:
        print(f"attncc dump: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("spec", str(args.spec))
    entries = write_kernels(out, [plan], manifest=manifest, archs=tuple(args.arch), aot=not args.no_aot)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    for entry in entries or [k for k in manifest["kernels"] if k["plan_key"] == plan.key()]:
        print(f"{entry['kernel']}: {out / entry['file']}")
        for arch, r in entry["targets"].items():
            if "error" in r:
                print(f"  {arch}: compile failed: {r['error'].splitlines()[0]}")
            else:
                print(f"  {arch}: shared {r['shared_bytes']} B, regs {r.get('num_regs', '?')}")
    print(f"manifest: {manifest_path}")
    return 0
