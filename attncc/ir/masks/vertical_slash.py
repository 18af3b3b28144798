"""``{vertical_slash: {vertical, slash, ...}}``: MInference's vertical-slash selection, at block
granularity: the kv blocks holding the key columns and the query-key diagonals that the last
queries attend to most (see :mod:`attncc.ir.selection` for what a selector means inside a mask
program, and ``docs/spec.md`` for the predicate)."""

from __future__ import annotations

from attncc.ir.masks.args import NONNEG, POS, need_int, need_mapping, params
from attncc.ir.masks.base import register
from attncc.ir.masks.selector import Selector

#: parameters and their defaults (MInference's: 64 last queries, the first 30 key columns and the
#: 100 newest diagonals always kept, 64-token blocks)
DEFAULTS = {"last_q": 64, "keep_first": 30, "keep_recent": 100}
_KEYS = ["vertical", "slash", "last_q", "keep_first", "keep_recent", "block"]


def _parse(arg, path, child):
    form = f"a mapping of parameters ({', '.join(_KEYS)})"
    need_mapping(arg, path, "vertical_slash", _KEYS, ["vertical", "slash"], form)
    for key in ("vertical", "slash", "last_q", "block"):
        if key in arg:
            need_int(arg[key], path + (key,), f"vertical_slash.{key}")
    for key in ("keep_first", "keep_recent"):
        if key in arg:
            need_int(arg[key], path + (key,), f"vertical_slash.{key}", 0)
    return Selector("vertical_slash", tuple(sorted(arg.items())))


register(
    "vertical_slash",
    "data-dependent: the kv blocks holding the top key columns and diagonals of the last queries' attention",
    params(
        {
            "vertical": POS,
            "slash": POS,
            "last_q": {**POS, "default": DEFAULTS["last_q"]},
            "keep_first": {**NONNEG, "default": DEFAULTS["keep_first"]},
            "keep_recent": {**NONNEG, "default": DEFAULTS["keep_recent"]},
            "block": POS,
        },
        ["vertical", "slash"],
    ),
    _parse,
)(Selector)
