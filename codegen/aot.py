"""Ahead-of-time compiles of generated kernels for GPU targets, without a GPU.

``compile_sources`` runs ``python -m attncc.codegen.aot`` in a subprocess with
``TRITON_INTERPRET`` unset (the interpreter mode of the calling process must not leak into
the compiler), which calls ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
for each (kernel, target) and writes TTIR / TTGIR / PTX / cubin plus shared-memory and register
counts.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from attncc.codegen.cache import FORWARD, KernelCache, KernelFamily, default_cache
from attncc.codegen.files import copy_file, write_file
from attncc.codegen.forward.generate import kernel_name
from attncc.ir.plan import AttentionPlan

log = logging.getLogger("attncc")

#: compute capabilities compiled by default: Hopper, Ampere
DEFAULT_ARCHS = (90, 80)
#: timeout for one batch of compiles, seconds
TIMEOUT_S = 600


@dataclass(frozen=True)
class Job:
    """One kernel to compile: its source file, name, the signature, constexprs and attributes the
    JIT derives from a real launch (:func:`recorded_jobs`), for ``arch``."""

    source: str
    kernel: str
    signature: dict
    constexprs: dict
    arch: int
    out_dir: str
    num_warps: int = 4
    num_stages: int = 2
    #: per argument name, Triton's attributes (``[["tt.divisibility", 16]]``)
    attrs: dict = field(default_factory=dict)
    #: what the launch was specialised for (shown in the manifest)
    specialised_for: str = ""


@dataclass
class _Launch:
    name: str
    fn: Any
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a ``JITFunction``: ``kernel[grid](...)`` records the launch, runs nothing."""

    def __init__(self, name: str, fn: Any, launches: list[_Launch]):
        self.name, self.fn, self.launches = name, fn, launches
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(_Launch(self.name, self.fn, args, kwargs))

        return launch


class _RecordingModule:
    def __init__(self, module: ModuleType, launches: list[_Launch]):
        self._module, self._launches = module, launches

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        if hasattr(attr, "arg_names") and hasattr(attr, "params"):
            return _Recorder(name, attr, self._launches)
        return attr


class RecordingCache(KernelCache):
    """A kernel cache whose kernels record their launches instead of running them: a launcher run
    with CPU tensors of the real shapes, through this cache, yields exactly the arguments the
    GPU launch passes (``target`` ``cuda``: the modules are imported for the compiler)."""

    def __post_init__(self):
        super().__post_init__()
        self.launches: list[_Launch] = []

    def module(self, plan: AttentionPlan, target: str, family: KernelFamily = FORWARD) -> Any:  # type: ignore[override]
        return _RecordingModule(super().module(plan, "cuda", family), self.launches)

    def kernel(self, plan: AttentionPlan, target: str):
        return getattr(self.module(plan, target), kernel_name(plan))


def recorded_jobs(
    launch: Callable[[KernelCache], object], family: KernelFamily, plan: AttentionPlan, arch: int, out_dir, what: str
) -> list[Job]:
    """``Job``s for every kernel ``launch(cache)`` launches, each with the signature, constexprs
    and divisibility attributes Triton's JIT derives from those very arguments (pointers 16-byte
    aligned, integers divisible by 16, integers equal to 1 made constants): the compiled kernel is
    the one that runs for that call."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    cache = RecordingCache(default_cache().root)
    launch(cache)
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    path = str(cache.source(plan, family))
    jobs = []
    for rec in cache.launches:
        binder = create_function_from_signature(rec.fn.signature, rec.fn.params, backend)
        bound, specialization, extra = binder(*rec.args, **rec.kwargs)
        options, signature, constexprs, attrs = rec.fn._pack_args(backend, rec.kwargs, bound, specialization, extra)
        names = rec.fn.arg_names
        jobs.append(
            Job(
                path,
                rec.name,
                dict(signature),
                {names[k[0]]: v for k, v in constexprs.items()},
                arch,
                str(out_dir),
                options.num_warps,
                options.num_stages,
                {names[k[0]]: v for k, v in attrs.items() if v},
                what,
            )
        )
    return jobs


def compile_jobs(jobs: list[Job], timeout: float = TIMEOUT_S, workers: int = 1) -> list[dict]:
    """Compile every job in ``workers`` subprocesses; one result dict per job, in order. A job
    that fails to compile gets ``{"error": message}`` instead of raising, so a dump lists every
    kernel."""
    if not jobs:
        return []
    started = time.perf_counter()
    archs = sorted({f"sm_{j.arch}" for j in jobs})
    log.info("ahead-of-time compile: %d kernels for %s in %d process(es)...", len(jobs), ", ".join(archs), workers)
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
            # the tiles and launch options the kernel was compiled with (codegen/configs.py)
            c = jobs[i].constexprs
            tiles = {k: c[k] for k in ("BLOCK_M", "BLOCK_N") if k in c}
            r["launch"] = dict(tiles, num_warps=jobs[i].num_warps, num_stages=jobs[i].num_stages)
            results[i] = r
    failed = sum("error" in r for r in results)
    log.info(
        "ahead-of-time compile: %d kernels in %.1f s (%d failed)", len(jobs), time.perf_counter() - started, failed
    )
    return results


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
    index = {name: i for i, name in enumerate(fn.arg_names)}
    src = ASTSource(
        fn=fn,
        signature=dict(job["signature"]),
        constexprs={(index[k],): v for k, v in job["constexprs"].items()},
        attrs={(index[k],): v for k, v in job.get("attrs", {}).items()},
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
        "specialised_for": job.get("specialised_for", ""),
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
