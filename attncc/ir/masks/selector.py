"""``{topk: {k, ...}}`` and ``{threshold: {tau, ...}}``: data-dependent block selection from a score
estimate (see :mod:`attncc.ir.selection` for what a selector means inside a mask program)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from attncc.ir.masks.args import NONNEG, POS, need_int, need_mapping, params, suggest
from attncc.ir.masks.base import Mask, MaskError, register
from attncc.ir.scores import GROUP_PARAMS, SCORES

_COMMON = ["score", *GROUP_PARAMS, "block", "min_blocks"]
_SCHEMA_COMMON = {
    "score": {"enum": list(SCORES), "default": "mean_pool"},
    **{p: POS for p in GROUP_PARAMS},
    "block": POS,
    "min_blocks": NONNEG,
}


def _common(key: str, arg: dict, path) -> None:
    score = arg.get("score", "mean_pool")
    if not isinstance(score, str) or score not in SCORES:
        raise MaskError(
            f"unknown score '{score}'{suggest(score, SCORES)}; expected one of {', '.join(SCORES)}", path + ("score",)
        )
    for p in (*GROUP_PARAMS, "block"):
        if p in arg:
            need_int(arg[p], path + (p,), f"{key}.{p}")
    if "min_blocks" in arg:
        need_int(arg["min_blocks"], path + ("min_blocks",), f"{key}.min_blocks", 0)


def _parse_topk(arg, path, child):
    need_mapping(arg, path, "topk", ["k", *_COMMON], ["k"], f"a mapping of parameters ({', '.join(['k', *_COMMON])})")
    need_int(arg.get("k"), path + ("k",), "topk.k")
    _common("topk", arg, path)
    return Selector("topk", tuple(sorted(arg.items())))


def _parse_threshold(arg, path, child):
    keys = ["tau", *_COMMON]
    need_mapping(arg, path, "threshold", keys, [], f"a mapping of parameters ({', '.join(keys)})")
    tau = arg.get("tau")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau <= 1:
        raise MaskError(f"threshold.tau must be a number in (0, 1], got {tau!r}", path + ("tau",))
    _common("threshold", arg, path)
    return Selector("threshold", tuple(sorted(arg.items())))


@register(
    "threshold",
    "data-dependent: the fewest kv blocks covering tau of the score mass",
    params({"tau": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, **_SCHEMA_COMMON}, ["tau"]),
    _parse_threshold,
)
@register(
    "topk",
    "data-dependent: the k highest-scoring kv blocks per query block",
    params({"k": POS, **_SCHEMA_COMMON}, ["k"]),
    _parse_topk,
)
@dataclass(frozen=True)
class Selector(Mask):
    """Data-dependent block selection (``topk`` / ``threshold``, and ``vertical_slash`` registered
    in :mod:`attncc.ir.masks.vertical_slash`): True on the block pairs the selector keeps at run
    time; it has no static dense mask, bounds or predicate."""

    method: str  # a registered selector key: "topk" | "threshold" | "vertical_slash"
    params: tuple[tuple[str, Any], ...]
    kind: ClassVar[str] = "selector"
    dynamic: ClassVar[bool] = True

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def to_spec(self):
        return {self.method: dict(self.params)}

    def _static(self, what: str):
        raise MaskError(f"'{self.method}' selects blocks from the data at run time and has no static {what}")

    def dense(self, h, q, kv, q_len, kv_len):
        self._static("dense mask")

    def bounds(self, qb, kb, h):
        self._static("block classification")

    def triton(self):
        self._static("predicate")

    @property
    def name(self):
        return self.method
