"""Kernel cache: generated sources on disk keyed by plan hash + generator + Triton version,
imported once per target (``interpret`` or ``cuda``) per process."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import pathlib
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from types import ModuleType

import triton
from attncc.codegen.generate import generate_forward, kernel_name

from attncc.plan import AttentionPlan

TARGETS = ("interpret", "cuda")


def default_cache_dir() -> pathlib.Path:
    """``$ATTNCC_CACHE_DIR``, else ``~/.cache/attncc`` (else a temp folder when home is read-only)."""
    env = os.environ.get("ATTNCC_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    home = pathlib.Path(os.path.expanduser("~")) / ".cache" / "attncc"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return pathlib.Path(tempfile.gettempdir()) / "attncc-cache"


@functools.lru_cache(maxsize=1)
def _generator_digest() -> str:
    """Hash of the code that writes kernel text (the templates and the mask predicates): a
    changed generator never reuses a stale file."""
    import attncc.masks

    h = hashlib.sha256()
    for path in (pathlib.Path(__file__).with_name("generate.py"), pathlib.Path(attncc.masks.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()[:8]


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_module(path: str | os.PathLike, name: str, target: str) -> ModuleType:
    """Import the generated source at ``path`` as module ``name`` for ``target`` (``interpret`` or
    ``cuda``); ``triton.jit`` reads kernel source from the file, so it must stay on disk."""
    if target not in TARGETS:
        raise ValueError(f"unknown kernel target '{target}'; expected one of {', '.join(TARGETS)}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import generated kernel source {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    with _interpret_env(target == "interpret"):
        spec.loader.exec_module(mod)
    return mod


@dataclass
class CacheStats:
    generated: int = 0  # sources generated (cache misses on disk)
    loaded: int = 0  # modules imported
    hits: int = 0  # lookups served from memory


@dataclass
class KernelCache:
    """Generated kernel sources under ``root/<triton version>/`` and their imported modules."""

    root: pathlib.Path = field(default_factory=default_cache_dir)
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self.root = pathlib.Path(self.root)
        self._modules: dict[tuple[str, str], ModuleType] = {}
        self._lock = threading.Lock()

    def source_key(self, plan: AttentionPlan) -> str:
        return f"{plan.key()}-{_generator_digest()}"

    def source_path(self, plan: AttentionPlan) -> pathlib.Path:
        return self.root / f"triton-{triton.__version__}" / f"{kernel_name(plan)}_{self.source_key(plan)}.py"

    def source(self, plan: AttentionPlan) -> pathlib.Path:
        """Path of the plan's kernel source, generating it only when it is not on disk yet."""
        path = self.source_path(plan)
        if not path.exists():
            write_source(path, generate_forward(plan))
            self.stats.generated += 1
        return path

    def module(self, plan: AttentionPlan, target: str) -> ModuleType:
        """The imported kernel module for ``target`` (``interpret`` or ``cuda``)."""
        key = (f"{self.source_key(plan)}-{triton.__version__}", target)
        with self._lock:
            mod = self._modules.get(key)
            if mod is not None:
                self.stats.hits += 1
                return mod
            path = self.source(plan)
            mod = load_module(path, f"attncc_kernels.{target}.{path.stem}", target)
            self._modules[key] = mod
            self.stats.loaded += 1
            return mod

    def kernel(self, plan: AttentionPlan, target: str):
        return getattr(self.module(plan, target), kernel_name(plan))


_default: KernelCache | None = None


def default_cache() -> KernelCache:
    global _default
    if _default is None:
        _default = KernelCache()
    return _default
