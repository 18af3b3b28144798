"""Kernel cache: generated sources on disk, named by a hash of their own text, imported once per
(plan, target) per process.

A file's name carries the SHA-256 of the source the generator writes for the plan, so the name
covers every byte of the file; before a file is imported its content is compared with that
source, and a file that differs (edited, truncated, written by another version) is rewritten,
never imported as it is. ``triton.jit`` reads kernel source from the file, so it stays on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pathlib
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import triton

from attncc.codegen.backward.generate import backward_source
from attncc.codegen.decode.generate import decode_kernel_name, generate_decode
from attncc.codegen.forward.generate import generate_forward, kernel_name
from attncc.config import config
from attncc.ir.plan import AttentionPlan

#: kernel targets: the compiled GPU kernels, or the same kernels under the Triton interpreter
TARGETS = ("interpret", "cuda")


@dataclass(frozen=True)
class KernelFamily:
    """A kind of generated module: its source from a plan, and the stem of its file name."""

    name: str
    generate: Callable[[AttentionPlan], str]
    stem: Callable[[AttentionPlan], str]


FORWARD = KernelFamily("forward", generate_forward, kernel_name)
BACKWARD = KernelFamily("backward", backward_source, lambda plan: f"{plan.pattern}_bwd")
DECODE = KernelFamily("decode", generate_decode, decode_kernel_name)

_process_dir: pathlib.Path | None = None


def _private_dir(path: pathlib.Path) -> pathlib.Path | None:
    """``path`` created (mode 0700) and writable by this user, or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


def default_cache_dir() -> pathlib.Path:
    """``$ATTNCC_CACHE_DIR``, else ``~/.cache/attncc``; where neither is writable, a fresh private
    folder for this process (never a shared, predictable path)."""
    global _process_dir
    if config.cache_dir:
        return pathlib.Path(str(config.cache_dir))
    home = _private_dir(pathlib.Path(os.path.expanduser("~")) / ".cache" / "attncc")
    if home is not None:
        return home
    if _process_dir is None:
        _process_dir = pathlib.Path(tempfile.mkdtemp(prefix="attncc-cache-"))
    return _process_dir


@contextlib.contextmanager
def _interpret_env(on: bool):
    """``TRITON_INTERPRET`` as ``on`` while a generated module is imported: ``@triton.jit`` picks
    the interpreter or the compiler at decoration time, so the two targets get separate modules."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def write_source(path: pathlib.Path, text: str) -> None:
    """Write a generated source atomically (concurrent writers never expose a partial file)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_module(path: str | os.PathLike, name: str, target: str) -> ModuleType:
    """Import the Python source at ``path`` as module ``name`` for ``target`` (``interpret`` or
    ``cuda``)."""
    if target not in TARGETS:
        raise ValueError(f"unknown kernel target '{target}'; expected one of {', '.join(TARGETS)}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import kernel source {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    with _interpret_env(target == "interpret"):
        spec.loader.exec_module(mod)
    return mod


@dataclass
class CacheStats:
    generated: int = 0  # source files written (absent, or differing from the expected text)
    loaded: int = 0  # modules imported
    hits: int = 0  # lookups served from memory


@dataclass
class KernelCache:
    """Generated kernel sources under ``root/triton-<version>/`` and their imported modules."""

    root: pathlib.Path = field(default_factory=default_cache_dir)
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self.root = pathlib.Path(self.root)
        # by AttentionPlan.kernel_key(): plans differing only in launch arguments share a module
        self._modules: dict[tuple[str, tuple, str], ModuleType] = {}
        self._sources: dict[tuple[str, tuple], tuple[pathlib.Path, str]] = {}
        self._lock = threading.Lock()

    def _expected(self, plan: AttentionPlan, family: KernelFamily) -> tuple[pathlib.Path, str]:
        key = (family.name, plan.kernel_key())
        hit = self._sources.get(key)
        if hit is None:
            text = family.generate(plan)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            hit = (self.root / f"triton-{triton.__version__}" / f"{family.stem(plan)}_{digest}.py", text)
            self._sources[key] = hit
        return hit

    def source_path(self, plan: AttentionPlan, family: KernelFamily = FORWARD) -> pathlib.Path:
        return self._expected(plan, family)[0]

    def source(self, plan: AttentionPlan, family: KernelFamily = FORWARD) -> pathlib.Path:
        """Path of the plan's kernel source, holding exactly the text the generator writes:
        written when absent, rewritten when its content differs."""
        path, text = self._expected(plan, family)
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != text:
            write_source(path, text)
            self.stats.generated += 1
        return path

    def module(self, plan: AttentionPlan, target: str, family: KernelFamily = FORWARD) -> ModuleType:
        """The imported kernel module for ``target`` (``interpret`` or ``cuda``)."""
        key = (family.name, plan.kernel_key(), target)
        with self._lock:
            mod = self._modules.get(key)
            if mod is not None:
                self.stats.hits += 1
                return mod
            path = self.source(plan, family)
            mod = load_module(path, f"attncc_kernels.{target}.{path.stem}", target)
            self._modules[key] = mod
            self.stats.loaded += 1
            return mod

    def kernel(self, plan: AttentionPlan, target: str):
        """The plan's forward kernel for ``target``."""
        return getattr(self.module(plan, target), kernel_name(plan))


_default: KernelCache | None = None


def default_cache() -> KernelCache:
    global _default
    if _default is None:
        _default = KernelCache()
    return _default
