"""Argument checks shared by the mask primitives' parsers: each raises MaskError at a key path."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar

from attncc.ir.masks.base import Mask, MaskError, Path


def suggest(word: str | int, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


#: the largest integer a spec may hold: lengths, positions and offsets are int32 in the kernels
MAX_INT = 2**31 - 1


def need_int(v: Any, path: Path, what: str, minimum: int = 1, maximum: int = MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise MaskError(f"{what} must be an integer >= {minimum}, got {v!r}", path)
    if v < minimum:
        raise MaskError(f"{what} must be >= {minimum}, got {v}", path)
    if v > maximum:
        why = "" if maximum != MAX_INT else " (lengths and positions are 32-bit in the kernels)"
        raise MaskError(f"{what} must be <= {maximum}{why}, got {_short(v)}", path)
    return v


def _short(v: int) -> str:
    s = str(v)
    return s if len(s) <= 24 else f"{s[:8]}...{s[-4:]} ({len(s)} digits)"


def need_triple(v: Any, path: Path, what: str, minimum: int) -> tuple[int, int, int]:
    if not isinstance(v, list) or len(v) != 3:
        raise MaskError(f"{what} must be a list of three integers, got {v!r}", path)
    a, b, c = (need_int(x, path + (i,), what, minimum) for i, x in enumerate(v))
    return a, b, c


def need_mapping(arg: Any, path: Path, key: str, allowed: list[str], required: list[str], form: str) -> dict:
    """``arg`` as a mapping whose keys are among ``allowed`` and include ``required``."""
    if not isinstance(arg, dict):
        raise MaskError(f"{key} takes {form}", path)
    extra = sorted(str(k) for k in set(arg) - set(allowed))
    if extra:
        raise MaskError(f"unknown key '{extra[0]}'{suggest(extra[0], allowed)}; {key} takes {form}", path + (extra[0],))
    missing = [k for k in required if k not in arg]
    if missing:
        raise MaskError(f"{key} needs '{missing[0]}'; it takes {form}", path)
    return arg


class IntArg(Mask):
    """A primitive whose whole argument is one integer, ``{key: N}`` (N >= 1): subclasses are
    dataclasses whose only field holds it; kernels are named ``<short><N>`` (``short``: the key)."""

    short: ClassVar[str] = ""

    @classmethod
    def parse(cls, arg: Any, path: Path, child) -> Mask:
        return cls(need_int(arg, path, cls.kind))  # type: ignore[call-arg]  # the subclass's one field

    @property
    def value(self) -> int:
        return getattr(self, dataclasses.fields(self)[0].name)  # type: ignore[arg-type]  # a dataclass

    def to_spec(self) -> Any:
        return {self.kind: self.value}

    @property
    def name(self) -> str:
        return f"{self.short or self.kind}{self.value}"


# -- JSON-schema fragments of arguments -----------------------------------------------------------
POS = {"type": "integer", "minimum": 1, "maximum": MAX_INT}
NONNEG = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
TRIPLE_POS = {"type": "array", "items": POS, "minItems": 3, "maxItems": 3}
TRIPLE_NONNEG = {"type": "array", "items": NONNEG, "minItems": 3, "maxItems": 3}


def params(props: dict, required: list[str]) -> dict:
    """The schema of a mapping argument with exactly these keys."""
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
