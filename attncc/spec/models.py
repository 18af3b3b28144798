"""The pydantic models of spec format v1 and what a loaded spec answers about one site."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, WithJsonSchema, field_validator

from attncc.ir import masks as M
from attncc.ir.masks.args import MAX_INT
from attncc.ir.permute import TilePermutation
from attncc.spec.errors import Path, Positions, SpecError, error_at
from attncc.spec.ranges import layer_matches

#: a mask node: validated by :func:`attncc.spec.parse.parse_mask`, described by ``$defs/Mask``
MaskNode = Annotated[Any, WithJsonSchema({"x-attncc-mask": True})]


class _Strict(BaseModel):
    # strict: an integer is an integer ('64' and 64.0 are refused, not coerced)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


#: every integer of a spec is below this (lengths and positions are 32-bit in the kernels)
Int = Annotated[int, Field(le=MAX_INT)]
#: largest kernel block (a tile dimension)
MAX_BLOCK = 256


class EveryLayers(_Strict):
    every: int = Field(ge=1, le=MAX_INT)
    offset: int = Field(default=0, ge=0, le=MAX_INT)


class Where(_Strict):
    layers: Int | str | list[Int] | EveryLayers | None = Field(
        default=None, description="layer group: 3, '0-1', '3,7,11', '2-' (open end), [1, 2] or {every: N, offset: K}"
    )
    module: str | None = Field(default=None, description="glob on the module path, e.g. '*.self_attn'")


class PermuteText(_Strict):
    tokens: int = Field(ge=0, le=MAX_INT)
    at: Literal["start", "end"] = "start"


class Permute(_Strict):
    grid: list[Int] | None = None
    tile: list[Int] | None = None
    text: PermuteText | None = Field(
        default=None, description="text tokens of a joint sequence, at its start or end: they keep their slots"
    )
    by: Literal["key_importance"] | None = None
    segment: int | None = Field(default=None, ge=1, le=MAX_INT)


class Reuse(_Strict):
    from_: str | Int | None = Field(default=None, alias="from")
    refresh_every: int | None = Field(default=None, ge=1, le=MAX_INT)
    dense_first: int | None = Field(default=None, ge=0, le=MAX_INT)


def _check_block(b: int) -> int:
    if b < 16 or b > MAX_BLOCK or b & (b - 1):
        raise ValueError(f"block sizes must be powers of two from 16 to {MAX_BLOCK}")
    return b


class BlockSize(_Strict):
    q: int
    kv: int

    @field_validator("q", "kv", mode="after")
    @classmethod
    def _block_pow2(cls, v):
        return _check_block(v)


class Rule(_Strict):
    name: str | None = None
    where: Where = Field(default=Where(), description="which sites the rule binds; both keys optional (AND)")
    mask: MaskNode = Field(default="full", description="the mask of every head not listed under `heads`")
    heads: dict[str | Int, MaskNode] | None = Field(
        default=None, description="per-head overrides keyed by head lists/ranges such as '0,3' or '4-7'"
    )
    permute: Permute | None = Field(
        default=None, description="token order the kernel works in: {grid: [T, H, W], tile: [t, h, w]}"
    )
    block_size: int | BlockSize | None = None
    reuse: Reuse | None = None

    @field_validator("block_size", mode="after")
    @classmethod
    def _block_pow2(cls, v):
        return _check_block(v) if isinstance(v, int) else v


class CompiledRule:
    """A rule's masks parsed: the base mask and the per-head overrides ``(key, heads, mask)``."""

    def __init__(self, base: M.Mask, overrides: list[tuple[str | int, list[int], M.Mask]]):
        self.base, self.overrides = base, overrides

    def masks(self) -> list[tuple[M.Mask, tuple[str | int, ...]]]:
        """Every mask of the rule with the key path it came from (relative to the rule)."""
        return [(self.base, ("mask",))] + [(m, ("heads", key)) for key, _, m in self.overrides]


class Spec(_Strict):
    attncc: Literal[1] = Field(description="format version")
    name: str = "spec"
    description: str | None = None
    block_size: int | BlockSize = 64
    masks: dict[str, MaskNode] = Field(default={}, description="named masks, usable by name in later masks and rules")
    rules: list[Rule] = Field(min_length=1, description="ordered; the first rule whose `where` matches a site wins")

    _source: str = PrivateAttr(default="<spec>")
    _lines: Positions = PrivateAttr(default_factory=dict)
    _named: dict[str, M.Mask] = PrivateAttr(default_factory=dict)
    _compiled: list[CompiledRule] = PrivateAttr(default_factory=list)

    @field_validator("block_size", mode="after")
    @classmethod
    def _block_pow2(cls, v):
        return _check_block(v) if isinstance(v, int) else v

    # -- errors -------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the spec came from: a file path, ``<string>`` or ``<dict>``."""
        return self._source

    def error(self, message: str, path: Path = ()) -> SpecError:
        """A SpecError located at ``path`` (the nearest recorded ancestor gives the line)."""
        return error_at(message, self._source, self._lines, path)

    # -- resolution -----------------------------------------------------------------------------
    def compiled(self, rule_index: int) -> CompiledRule:
        return self._compiled[rule_index]

    def block_sizes(self, rule_index: int | None = None) -> tuple[int, int]:
        bs = self.block_size
        rule_bs = None if rule_index is None else self.rules[rule_index].block_size
        if rule_bs is not None:
            bs = rule_bs
        return (bs, bs) if isinstance(bs, int) else (bs.q, bs.kv)

    def rule_name(self, index: int) -> str:
        return self.rules[index].name or f"rules[{index}]"

    def rule_index(self, name: str) -> int | None:
        """The index of the rule called ``name`` (named or ``rules[i]``), or None."""
        for j in range(len(self.rules)):
            if self.rule_name(j) == name:
                return j
        return None

    def match(self, layer: int, module: str = "") -> int | None:
        """Index of the first rule whose ``where`` matches, or None."""
        for i, rule in enumerate(self.rules):
            if layer_matches(rule.where.layers, layer) and (
                rule.where.module is None or fnmatch.fnmatchcase(module, rule.where.module)
            ):
                return i
        return None

    def head_policy(self, rule_index: int, num_heads: int) -> tuple[tuple[M.Mask, ...], tuple[int, ...]]:
        """(distinct mask programs, program index per head) for a rule applied to ``num_heads``."""
        rule = self._compiled[rule_index]
        per_head: list[M.Mask] = [rule.base] * num_heads
        for key, heads, mask in rule.overrides:
            for h in heads:
                if h >= num_heads:
                    raise self.error(
                        f"head {h} is out of range: the attention has {num_heads} heads (0-{num_heads - 1})",
                        ("rules", rule_index, "heads", key, "__key__"),
                    )
                per_head[h] = mask
        programs: list[M.Mask] = []
        index = []
        for m in per_head:
            if m not in programs:
                programs.append(m)
            index.append(programs.index(m))
        return tuple(programs), tuple(index)

    def permutation(self, rule_index: int) -> TilePermutation | None:
        p = self.rules[rule_index].permute
        if p is None or p.grid is None or p.tile is None:
            return None
        (gt, gh, gw), (tt, th, tw) = p.grid, p.tile
        text = (p.text.tokens, p.text.at) if p.text is not None else (0, "start")
        return TilePermutation((gt, gh, gw), (tt, th, tw), *text)
