"""Layer and head selectors: ``3``, ``'0-1'``, ``'3,7,11'``, ``'2-'`` (open end), ``[1, 2]``,
``{every: N, offset: K}``."""

from __future__ import annotations

import re
from typing import Any

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d*)\s*)?$")
#: the largest layer or head index a selector may name
MAX_INDEX = 2**31 - 1


def parse_index_set(text: str, what: str) -> list[tuple[int, int | None]]:
    """'0-1', '3,7,11', '2-' -> inclusive ranges (None = open end)."""
    out: list[tuple[int, int | None]] = []
    for part in str(text).split(","):
        m = _RANGE.match(part)
        if not m:
            raise ValueError(
                f"malformed {what} range '{part.strip()}' in '{text}': expected forms like '3', '0-1', '3,7,11' or '2-'"
            )
        if max(len(m.group(1)), len(m.group(2) or "")) > 10:
            raise ValueError(f"{what} index in '{part.strip()}' is above {MAX_INDEX}")
        lo = int(m.group(1))
        hi = None if m.group(2) == "" else int(m.group(2)) if m.group(2) is not None else lo
        if max(lo, hi or 0) > MAX_INDEX:
            raise ValueError(f"{what} index {max(lo, hi or 0)} in '{text}' is above {MAX_INDEX}")
        if hi is not None and hi < lo:
            raise ValueError(f"{what} range '{part.strip()}' ends before it starts")
        out.append((lo, hi))
    return out


def layer_matches(sel: Any, layer: int) -> bool:
    """Whether a validated layer selector (``Where.layers``) includes ``layer``."""
    if sel is None:
        return True
    if isinstance(sel, int):
        return layer == sel
    if isinstance(sel, list) and all(isinstance(x, int) for x in sel):
        return layer in sel
    if isinstance(sel, str):
        return any(lo <= layer and (hi is None or layer <= hi) for lo, hi in parse_index_set(sel, "layer"))
    # {every: N, offset: K}
    return layer >= sel.offset and (layer - sel.offset) % sel.every == 0
