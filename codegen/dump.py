"""Kernel dump: each plan's generated ``.py`` source, its printed plan, TTIR/TTGIR/PTX per GPU
target (compiled ahead of time, no GPU needed) and manifest entries."""

from __future__ import annotations

import os
import pathlib

from attncc.codegen.backward.launch import write_backward_kernels
from attncc.codegen.cache import KernelCache, default_cache
from attncc.codegen.decode.launch import write_decode_kernels
from attncc.codegen.files import copy_file, write_file
from attncc.codegen.forward.generate import kernel_name
from attncc.codegen.forward.launch import compile_plans
from attncc.codegen.selectors.layout import layout
from attncc.ir.plan import AttentionPlan, plan_density


def density_record(plan: AttentionPlan) -> dict:
    """Per-head token density and per-program block counts of a static plan (exact, no S x S)."""
    dens = plan_density(plan)
    return {
        "head_density": dens.per_head(6),
        "blocks": {
            "num_q_blocks": -(-plan.q_len // plan.block_q),
            "num_kv_blocks": -(-plan.kv_len // plan.block_kv),
            "per_program": [
                {
                    "partial": p.partial,
                    "full": p.full,
                    "visited": p.visited,
                    "total": p.blocks,
                    "block_density": round(p.visited / p.blocks, 6),
                }
                for p in dens.programs
            ],
        },
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
        copy_file(src, out / src.name)
        write_file(out / f"{src.stem}.plan.txt", plan.describe() + "\n")
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
                **density_record(plan),
                "targets": {},
            }
        )
        if plan.key() in runs_for:
            entries[-1]["runs_for"] = runs_for[plan.key()]
    if aot and unique:
        results = compile_plans(unique, out, archs, cache)
        for entry, per_arch in zip(entries, results):
            for r in per_arch:
                r["files"] = {k: os.path.relpath(v, out) for k, v in r.get("files", {}).items()}
                entry["targets"][r.pop("arch")] = r
    if backward and unique:
        _write_backward(out, unique, entries, aot)
    if unique:
        _write_decode(out, unique, entries, aot)
    if manifest is not None:
        manifest.setdefault("kernels", []).extend(entries)
    return entries


def _kernel_plans(plans: list[AttentionPlan], runs_for: dict[str, str]) -> list[AttentionPlan]:
    """The static plans whose kernels actually run: a plan with run-time block selection runs
    the forward kernel of two static plans (selected blocks, the rest) over run-time tables."""
    out: list[AttentionPlan] = []
    for p in plans:
        if not p.is_dynamic:
            out.append(p)
            continue
        lay = layout(p)
        for part, role in ((lay.plan_sel, "selected blocks"), (lay.plan_not, "unselected blocks")):
            runs_for[part.key()] = f"{role} of dynamic plan {p.key()} (rule {p.rule or '-'})"
            out.append(part)
    return out


def _write_decode(out: pathlib.Path, plans: list[AttentionPlan], entries: list[dict], aot: bool) -> None:
    """Attach each plan's decode kernels (split-KV step and merge, compiled for one query) to its
    manifest entry, or the reason its decode steps run the forward kernel."""
    written, refused = write_decode_kernels(out, plans, archs=(90,), aot=aot)
    by_key = {w["plan_key"]: w for w in written}
    for p, e in zip(plans, entries):
        e["decode"] = by_key.get(p.key()) or {"error": f"no decode kernels: {refused[p.key()]}"}


def _write_backward(out: pathlib.Path, plans: list[AttentionPlan], entries: list[dict], aot: bool) -> None:
    """Attach each plan's backward kernels (dQ, dK/dV) to its manifest entry."""
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
