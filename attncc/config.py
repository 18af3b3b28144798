"""Typed settings read from ``ATTNCC_*`` environment variables, with ``scope()`` overrides for tests.

| variable | type | default | meaning |
| --- | --- | --- | --- |
| ``ATTNCC_DUMP_DIR`` | path | unset | write every compiled graph's passes, manifest and kernels under this folder |
| ``ATTNCC_LOG`` | ``0``/``1``/``info``/``debug`` | unset | log each detected site and its binding to stderr |
| ``ATTNCC_EXECUTOR`` | executor name | ``auto`` | default ``executor`` option |
| ``ATTNCC_INNER`` | ``inductor``/``eager`` | ``inductor`` | default ``inner`` option |
| ``ATTNCC_STRICT`` | bool | ``0`` | default ``strict`` option |
| ``ATTNCC_DUMP_AOT`` | bool | ``1`` | dumps compile kernels ahead of time (TTIR/PTX, sm_90, sm_80) |
| ``ATTNCC_DUMP_MLIR`` | bool | ``1`` | dumps hold the rewritten graph as MLIR (torch-mlir) |
| ``ATTNCC_CACHE_DIR`` | path | ``~/.cache/attncc`` | generated kernel sources (else a private folder per process) |

A leaf module: every layer may read settings from it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class Setting:
    """One environment switch: its variable, type and default."""

    env: str
    kind: type
    default: object
    help: str


SETTINGS: dict[str, Setting] = {
    "dump_dir": Setting("ATTNCC_DUMP_DIR", str, None, "folder for the per-graph dump"),
    "log": Setting("ATTNCC_LOG", str, None, "log level for site/binding messages (info, debug)"),
    "executor": Setting("ATTNCC_EXECUTOR", str, "auto", "default executor"),
    "inner": Setting("ATTNCC_INNER", str, "inductor", "compiler for the rest of the graph"),
    "strict": Setting("ATTNCC_STRICT", bool, False, "unmatched rules or sites are errors"),
    "dump_aot": Setting("ATTNCC_DUMP_AOT", bool, True, "dumped kernels are compiled ahead of time for sm_90/sm_80"),
    "dump_mlir": Setting("ATTNCC_DUMP_MLIR", bool, True, "the dump holds the rewritten graph as MLIR (torch-mlir)"),
    "cache_dir": Setting("ATTNCC_CACHE_DIR", str, None, "folder for generated kernel sources"),
}


def _parse(setting: Setting, raw: str) -> object:
    if setting.kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{setting.env}={raw!r}: expected one of 1/0/true/false/yes/no/on/off")
    return raw if raw != "" else setting.default


class _Config:
    """Attribute access reads the override stack first, then the environment, then the default."""

    def __init__(self) -> None:
        self._overrides: list[dict[str, object]] = []

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in SETTINGS:
            raise AttributeError(f"unknown attncc setting '{name}'; known: {', '.join(SETTINGS)}")
        for layer in reversed(self._overrides):
            if name in layer:
                return layer[name]
        setting = SETTINGS[name]
        raw = os.environ.get(setting.env)
        return setting.default if raw is None else _parse(setting, raw)

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in SETTINGS}

    @contextlib.contextmanager
    def scope(self, **overrides: object) -> Iterator[_Config]:
        """Temporarily override settings (environment variables are left untouched)."""
        unknown = set(overrides) - set(SETTINGS)
        if unknown:
            raise AttributeError(f"unknown attncc setting(s) {sorted(unknown)}; known: {', '.join(SETTINGS)}")
        self._overrides.append(dict(overrides))
        try:
            yield self
        finally:
            self._overrides.pop()


config = _Config()
scope = config.scope
