"""Kernel tiles and launch options, decoupled from the plan's sparsity block.

A plan's ``block_q x block_kv`` is its *sparsity block*: the granularity of explain's block maps
and of data-dependent selections. The generated kernels run on their own tiles:

* a static mask's block table is built at the kernel tile itself (classification is exact at any
  power-of-two tile, so a tile larger than the sparsity block merges table rows and columns and a
  smaller one splits them);
* a table given at run time (a data-dependent selection, a run-time key order) stays at the
  plan's blocks: the kernel tile is clipped to divide them and each program walks the
  ``block_kv / BLOCK_N`` sub-tiles of every listed kv block (``KV_MULT``), ``block_q / BLOCK_M``
  programs sharing a table row (``Q_MULT``).

Default tiles come per (GPU architecture, dtype, head dim) from FlexAttention's tables in
torch's ``template_heuristics/triton.py``, changed where this kernel compiled for sm_90 spills
with them (``tests/test_aot.py`` compiles every entry for sm_90 and sm_80 and fails on a spill). Under
the Triton interpreter the tiles are the plan's blocks unless a config is passed explicitly.
``ATTNCC_AUTOTUNE=1`` times up to four candidates per (kernel, head dim, dtype, row-length
class) on the first CUDA call and keeps the fastest on disk (:func:`autotuned`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from attncc.ir.plan import AttentionPlan


@dataclass(frozen=True)
class TileConfig:
    """One kernel's tiles and launch options. Forward / dQ: ``block_m`` query rows per program,
    walking kv tiles of ``block_n``; dK/dV: ``block_n`` kv rows per program, walking query tiles of
    ``block_m``."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for what, b in (("block_m", self.block_m), ("block_n", self.block_n)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"TileConfig.{what} {b} must be a power of two >= 16 (tl.dot tiles)")
        if self.num_warps not in (1, 2, 4, 8, 16) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"TileConfig warps {self.num_warps} / stages {self.num_stages} out of range")

    def text(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"

    def launch(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the dK/dV and dQ kernels (FlexAttention's ``(BLOCK_M1, BLOCK_N1, BLOCK_M2,
    BLOCK_N2)`` are ``(dkdv.block_m, dkdv.block_n, dq.block_m, dq.block_n)``)."""

    dkdv: TileConfig
    dq: TileConfig


T = TileConfig

#: forward defaults: (arch class, "fp32" | "16bit", head-dim class) -> tiles. FlexAttention's
#: sm_90 16-bit entries are d64 128x128 w4 s3, d128 128x64 w8 s3, d256 64x32 w4 s3; compiled for
#: sm_90 this kernel spills 424 B at d64 128x128 w4 s3 (255 registers); 128x128 w8 s3 fits at
#: 241 and 128x64 w8 s3 at 159, the default here (3 stages: two k/v loads in flight per step);
#: fp32 (exact "ieee" dots, no tensor cores) needs 8 warps to stay off the stack
FORWARD: dict[tuple[str, str, int], TileConfig] = {
    ("sm90", "16bit", 64): T(128, 64, 8, 3),
    ("sm90", "16bit", 128): T(128, 64, 8, 3),
    ("sm90", "16bit", 256): T(64, 32, 8, 3),
    ("sm90", "fp32", 64): T(64, 32, 8, 2),
    ("sm90", "fp32", 128): T(32, 64, 8, 2),
    ("sm90", "fp32", 256): T(32, 16, 8, 2),
    ("sm80", "16bit", 64): T(128, 64, 4, 3),
    ("sm80", "16bit", 128): T(128, 64, 8, 3),
    ("sm80", "16bit", 256): T(64, 32, 8, 2),
    ("sm80", "fp32", 64): T(64, 32, 8, 2),
    ("sm80", "fp32", 128): T(32, 64, 8, 2),
    ("sm80", "fp32", 256): T(32, 16, 8, 2),
}
#: what ``ATTNCC_AUTOTUNE`` times besides the default, per dtype class (FlexAttention's autotune
#: list, cut to configs that compile without spilling for sm_90)
FORWARD_CANDIDATES = {
    "16bit": (T(128, 128, 8, 3), T(128, 64, 4, 3), T(128, 32, 8, 3), T(64, 64, 4, 3)),
    "fp32": (T(64, 32, 8, 2), T(32, 64, 8, 2), T(32, 32, 4, 2)),
}


def _bwd(dkdv: tuple[int, int, int, int], dq: tuple[int, int, int, int]) -> BackwardConfig:
    return BackwardConfig(T(*dkdv), T(*dq))


#: backward defaults: (arch class, dtype class, head-dim class) -> tiles. FlexAttention's sm_90
#: d <= 128 entry is (64, 128, 128, 64), 3 stages, 8 warps; this dK/dV kernel holds both fp32
#: accumulators and a 64 x 128 dK/dV spills 600 B at d64 (936 B at d128), so it walks query
#: tiles of 32 (d64: 206 registers, d128: 198, no stack); dQ keeps FlexAttention's 128 x 64
BACKWARD: dict[tuple[str, str, int], BackwardConfig] = {
    ("sm90", "16bit", 64): _bwd((32, 128, 8, 2), (128, 64, 8, 3)),
    ("sm90", "16bit", 128): _bwd((32, 64, 8, 2), (128, 64, 8, 3)),
    ("sm90", "16bit", 256): _bwd((32, 64, 8, 1), (64, 32, 8, 2)),
    ("sm80", "16bit", 64): _bwd((32, 64, 8, 2), (128, 32, 8, 3)),
    ("sm80", "16bit", 128): _bwd((32, 64, 8, 2), (64, 64, 8, 2)),
    ("sm80", "16bit", 256): _bwd((32, 64, 8, 1), (64, 32, 8, 2)),
}
#: fp32 backward on any GPU, per head-dim class: thin tiles and 8 warps keep the exact dots off
#: the stack (FlexAttention's fp32 backward is 16 x 16 tiles, 1 stage)
BACKWARD_FP32 = {
    64: _bwd((16, 64, 8, 1), (64, 16, 8, 1)),
    128: _bwd((16, 32, 8, 1), (32, 16, 8, 1)),
    256: _bwd((16, 32, 8, 1), (32, 16, 8, 1)),
}
FORWARD_FALLBACK = T(64, 64, 4, 2)
BACKWARD_FALLBACK = _bwd((32, 64, 8, 1), (64, 32, 8, 2))


def arch_class(arch: int | None) -> str:
    """``sm90`` for Hopper (and later, until measured), ``sm80`` for Ampere/Ada, else ``other``."""
    if arch is None:
        return "other"
    return "sm90" if arch >= 90 else "sm80" if arch >= 80 else "other"


def _classes(plan: AttentionPlan, dtype: str | None) -> tuple[str, int]:
    d = max(plan.head_dim, plan.head_dim_v)
    dclass = 64 if d <= 64 else 128 if d <= 128 else 256
    return ("fp32" if (dtype or plan.dtype) == "float32" else "16bit"), dclass


def plan_tiles(plan: AttentionPlan) -> TileConfig:
    """The plan's sparsity block as tiles (the interpreter's default), with the launch options the
    kernels used before tiles were decoupled."""
    warps = 8 if max(plan.head_dim, plan.head_dim_v) > 128 else 4
    return TileConfig(plan.block_q, plan.block_kv, warps, 2)


def forward_config(plan: AttentionPlan, arch: int | None, dtype: str | None = None) -> TileConfig:
    """Forward tiles for ``sm_<arch>`` (``None``: the interpreter, which keeps the plan's blocks)."""
    if arch is None:
        return plan_tiles(plan)
    return FORWARD.get((arch_class(arch), *_classes(plan, dtype)), FORWARD_FALLBACK)


def backward_config(plan: AttentionPlan, arch: int | None, dtype: str | None = None) -> BackwardConfig:
    """Backward tiles for ``sm_<arch>`` (``None``: the interpreter, the plan's blocks)."""
    if arch is None:
        t = plan_tiles(plan)
        return BackwardConfig(TileConfig(t.block_m, t.block_n, t.num_warps, 1), t)
    dtype_class, dclass = _classes(plan, dtype)
    if dtype_class == "fp32":
        return BACKWARD_FP32[dclass]
    return BACKWARD.get((arch_class(arch), dtype_class, dclass), BACKWARD_FALLBACK)


def forward_candidates(plan: AttentionPlan, arch: int, dtype: str | None = None) -> list[TileConfig]:
    """What autotune times: the default first, then its dtype class's candidates."""
    return [forward_config(plan, arch, dtype), *FORWARD_CANDIDATES[_classes(plan, dtype)[0]]]


def at_tiles(plan: AttentionPlan, block_m: int, block_n: int) -> AttentionPlan:
    """The plan with its block tables built at ``block_m x block_n``: the same masks (the kernels
    evaluate them exactly on partial tiles), classified at the kernel's tiles."""
    if (plan.block_q, plan.block_kv) == (block_m, block_n):
        return plan
    return dataclasses.replace(plan, block_q=block_m, block_kv=block_n)


def fit_to_table(cfg: TileConfig, block_q: int, block_kv: int) -> tuple[TileConfig, int, int]:
    """``(tiles, Q_MULT, KV_MULT)`` for a block table given at ``block_q x block_kv``: the tiles
    clipped to divide the table's blocks, and how many tiles one table block holds per side."""
    bm, bn = min(cfg.block_m, block_q), min(cfg.block_n, block_kv)
    if block_q % bm or block_kv % bn:
        raise ValueError(f"tiles {bm}x{bn} do not divide the table's blocks {block_q}x{block_kv}")
    return TileConfig(bm, bn, cfg.num_warps, cfg.num_stages), block_q // bm, block_kv // bn


def cuda_arch(device) -> int:
    """``sm`` number of a CUDA device (90 for H100/H200)."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# -- autotune -----------------------------------------------------------------------------------

#: most configs timed per key
MAX_CANDIDATES = 4


def autotune_enabled() -> bool:
    return os.environ.get("ATTNCC_AUTOTUNE", "0") not in ("", "0")


def length_class(n: int) -> int:
    """Row-length class of a kv length: its power of two, at least 1024 (tunings are shared
    within a class)."""
    return max(1024, 1 << max(0, n - 1).bit_length())


def tune_key(plan: AttentionPlan, role: str, arch: int, dtype: str, *, tabled: bool = False) -> str:
    """What a tuning is shared by: the kernel (its source key), the role, the architecture, dtype,
    head dims, whether the table comes at run time, and the kv length's class."""
    source = hashlib.sha256(repr(plan.kernel_key()).encode()).hexdigest()[:16]
    table = "runtime-table" if tabled else "static-table"
    return f"{role}|{source}|sm{arch}|{dtype}|d{plan.head_dim}/{plan.head_dim_v}|{table}|L{length_class(plan.kv_len)}"


def tuning_cache(root: str | os.PathLike) -> TuningCache:
    """The process's tuning cache: ``tuning.json`` in the kernel cache folder ``root``."""
    global _TUNING
    root = pathlib.Path(root)
    if _TUNING is None or _TUNING.path.parent != root:
        _TUNING = TuningCache(root / "tuning.json")
    return _TUNING


_TUNING: TuningCache | None = None


def cuda_time_ms(fn: Callable[[], None], reps: int = 10) -> float:
    """Mean milliseconds of ``fn`` over ``reps`` back-to-back runs, by CUDA events (one warm-up)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


class TuningCache:
    """Chosen configs on disk (one JSON file), keyed by :func:`tune_key`; in memory per process."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._mem: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._mem is None:
            try:
                data = json.loads(self.path.read_text())
                self._mem = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._mem = {}
        return self._mem

    def get(self, key: str) -> TileConfig | None:
        hit = self._load().get(key)
        if not isinstance(hit, dict):
            return None
        try:
            return TileConfig(**{f: int(hit[f]) for f in ("block_m", "block_n", "num_warps", "num_stages")})
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, cfg: TileConfig, times_ms: dict[str, float]) -> None:
        mem = self._load()
        mem[key] = dict(asdict(cfg), times_ms=times_ms)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(mem, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def autotuned(
    key: str,
    candidates: list[TileConfig],
    run: Callable[[TileConfig], None],
    timer: Callable[[Callable[[], None]], float],
    cache: TuningCache,
) -> TileConfig:
    """The fastest of ``candidates`` (at most :data:`MAX_CANDIDATES`, first = default) for ``key``:
    read from ``cache``, else each is run once to compile, then timed by ``timer(fn) -> ms``; a
    candidate that fails to compile or launch (shared memory, registers) is dropped, and if every
    one fails the default's error is raised."""
    hit = cache.get(key)
    if hit is not None:
        return hit
    unique = list(dict.fromkeys(candidates))[:MAX_CANDIDATES]
    times: dict[str, float] = {}
    best, best_ms, first_error = unique[0], float("inf"), None
    for cfg in unique:
        try:
            run(cfg)
            ms = timer(functools.partial(run, cfg))
        except Exception as e:  # a config the device cannot run is not a candidate
            first_error = first_error or e
            continue
        times[cfg.text()] = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    if not times:
        assert first_error is not None
        raise first_error
    cache.put(key, best, times)
    return best
