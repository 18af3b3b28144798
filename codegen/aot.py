"""Ahead-of-time compiles of generated kernels for GPU targets, without a GPU.

``compile_sources`` runs ``python -m attncc.codegen.aot`` in a subprocess with
``TRITON_INTERPRET`` unset (the interpreter mode of the calling process must not leak into
the compiler), which calls ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
for each (kernel, target) and writes TTIR / TTGIR / PTX / cubin plus shared-memory and register
counts.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from attncc.codegen.cache import KernelCache, KernelFamily, default_cache
from attncc.codegen.files import copy_file, write_file
from attncc.codegen.forward.generate import kernel_constexprs, kernel_name, kernel_signature, launch_options
from attncc.ir.plan import AttentionPlan

#: compute capabilities compiled by default: Hopper, Ampere
DEFAULT_ARCHS = (90, 80)
#: timeout for one batch of compiles, seconds
TIMEOUT_S = 600


@dataclass(frozen=True)
class Job:
    """One kernel to compile: its source file, name, signature and constexprs, for ``arch``."""

    source: str
    kernel: str
    signature: dict
    constexprs: dict
    arch: int
    out_dir: str
    num_warps: int = 4
    num_stages: int = 2


def job_for(plan: AttentionPlan, arch: int, out_dir: str | os.PathLike, cache: KernelCache | None = None) -> Job:
    cache = cache or default_cache()
    return Job(
        str(cache.source(plan)),
        kernel_name(plan),
        kernel_signature(plan),
        kernel_constexprs(plan),
        arch,
        str(out_dir),
        **launch_options(plan),
    )


def compile_jobs(jobs: list[Job], timeout: float = TIMEOUT_S, workers: int = 1) -> list[dict]:
    """Compile every job in ``workers`` subprocesses; one result dict per job, in order. A job
    that fails to compile gets ``{"error": message}`` instead of raising, so a dump lists every
    kernel."""
    if not jobs:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    workers = max(1, min(workers, len(jobs)))
    # round-robin so each worker gets a similar mix
    shares = [list(range(w, len(jobs), workers)) for w in range(workers)]
    procs = []
    for share in shares:
        proc = subprocess.Popen(
            [sys.executable, "-m", "attncc.codegen.aot"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps([jobs[i].__dict__ for i in share]))
        proc.stdin.close()
    results: list[dict] = [{} for _ in jobs]
    for share, proc in zip(shares, procs):
        assert proc.stdout is not None and proc.stderr is not None
        try:
            stdout = proc.stdout.read()
            stderr = proc.stderr.read()
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"ahead-of-time compile subprocess failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        for i, r in zip(share, json.loads(stdout.strip().splitlines()[-1])):
            results[i] = r
    return results


def compile_plans(
    plans: list[AttentionPlan],
    out_dir: str | os.PathLike,
    archs=DEFAULT_ARCHS,
    cache: KernelCache | None = None,
    workers: int = 1,
) -> list[list[dict]]:
    """Per plan, one result per arch: files written under ``out_dir/<kernel file stem>/sm_<arch>/``."""
    cache = cache or default_cache()
    jobs = []
    for plan in plans:
        stem = cache.source(plan).stem
        jobs += [job_for(plan, a, pathlib.Path(out_dir) / stem / f"sm_{a}", cache) for a in archs]
    results = compile_jobs(jobs, workers=workers)
    return [results[i * len(archs) : (i + 1) * len(archs)] for i in range(len(plans))]


def write_family(
    folder: str | os.PathLike,
    plans: list[AttentionPlan],
    family: KernelFamily,
    names: Callable[[AttentionPlan], dict[str, str]],
    jobs: Callable[[AttentionPlan, int, pathlib.Path], list[Job]],
    *,
    archs: tuple[int, ...] = (90,),
    aot: bool = True,
) -> list[dict]:
    """Dump the ``family`` kernels of distinct plans into ``folder``: ``<stem>_<hash>.py`` (the
    source Triton runs) and, when ``aot``, ``<stem>_<hash>/sm_<arch>/<kernel>.{ttir,ttgir,ptx,cubin}``
    compiled without a GPU (``jobs(plan, arch, out_dir)``). One manifest entry per distinct plan,
    with its kernels by role (``names(plan)``); a kernel that fails to compile carries its error
    instead of files."""
    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    unique = list({p.key(): p for p in plans}.values())
    entries, todo, owners = [], [], []
    for plan in unique:
        src = default_cache().source(plan, family)
        copy_file(src, out / src.name)
        entry = {"plan_key": plan.key(), "pattern": plan.pattern, "file": src.name, "kernels": names(plan)}
        entry["targets"] = {}
        entries.append(entry)
        if aot:
            for arch in archs:
                for job in jobs(plan, arch, out / src.stem / f"sm_{arch}"):
                    todo.append(job)
                    owners.append(entry)
    if todo:
        for entry, result in zip(owners, compile_jobs(todo)):
            result["files"] = {k: os.path.relpath(v, out) for k, v in result.get("files", {}).items()}
            entry["targets"].setdefault(result.pop("arch"), {})[result.pop("kernel")] = result
    return entries


def _resource_usage(cubin: pathlib.Path) -> dict:
    """Registers / spills from ``cuobjdump --dump-resource-usage`` (shipped with Triton)."""
    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    exe = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if exe is None:
        return {}
    text = subprocess.run([exe, "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    out = {}
    for key, name in (("REG", "num_regs"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes")):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            out[name] = int(m.group(1))
    return out


def _compile_one(job: dict) -> dict:
    import importlib.util

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location(f"attncc_aot_{pathlib.Path(job['source']).stem}", job["source"])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load kernel source {job['source']}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    fn = getattr(mod, job["kernel"])
    signature = dict(job["signature"])
    signature.update({k: "constexpr" for k in job["constexprs"]})
    src = ASTSource(
        fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in job["constexprs"].items()}
    )
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", job["arch"], 32),
        options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
    )
    out = pathlib.Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for ext in ("ttir", "ttgir", "ptx", "cubin"):
        if ext in compiled.asm:
            path = out / f"{job['kernel']}.{ext}"
            data = compiled.asm[ext]
            write_file(path, data)
            files[ext] = str(path)
    result = {
        "arch": f"sm_{job['arch']}",
        "kernel": job["kernel"],
        "files": files,
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": job["num_warps"],
        "num_stages": job["num_stages"],
    }
    if "cubin" in files:
        result.update(_resource_usage(pathlib.Path(files["cubin"])))
    return result


def main() -> None:
    """Subprocess entry: a JSON list of jobs on stdin, a JSON list of results as the last stdout line."""
    import warnings

    warnings.filterwarnings("ignore")
    jobs = json.loads(sys.stdin.read())
    results = []
    for job in jobs:
        try:
            results.append(_compile_one(job))
        except Exception as e:  # noqa: BLE001 - reported per kernel, never swallowed
            results.append(
                {"arch": f"sm_{job['arch']}", "kernel": job["kernel"], "error": f"{type(e).__name__}: {e}"[:4000]}
            )
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
