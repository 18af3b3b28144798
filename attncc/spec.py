"""Spec format v1: YAML -> validated ``Spec`` with line-accurate ``SpecError``s."""

from __future__ import annotations

import difflib
import fnmatch
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from attncc import masks as M
from attncc.permute import TilePermutation

Path_ = tuple[Union[str, int], ...]


class SpecError(ValueError):
    """A spec is invalid. The message names the file, line/column, key path and what was expected."""

    def __init__(self, message: str, source: str = "<spec>", line: int | None = None,
                 column: int | None = None, path: Path_ = ()):
        self.message, self.source, self.line, self.column, self.path = message, source, line, column, path
        where = source
        if line is not None:
            where += f":{line}" + (f":{column}" if column is not None else "")
        key = "/".join(str(p) for p in path)
        super().__init__(f"{where}: {('at ' + key + ': ') if key else ''}{message}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the position of every node by key path."""


def _positions(node: yaml.Node, path: Path_, out: dict[Path_, tuple[int, int]], source: str) -> None:
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for k, v in node.value:
            key = k.value
            if key in seen:
                raise SpecError(f"duplicate key '{key}'", source, k.start_mark.line + 1,
                                k.start_mark.column + 1, path + (key,))
            seen.add(key)
            out[path + (key, "__key__")] = (k.start_mark.line + 1, k.start_mark.column + 1)
            _positions(v, path + (key,), out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _positions(v, path + (i,), out, source)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EveryLayers(_Strict):
    every: int = Field(ge=1)
    offset: int = Field(default=0, ge=0)


class Where(_Strict):
    layers: Union[int, str, list[int], EveryLayers, None] = None
    module: Union[str, None] = None


class Permute(_Strict):
    grid: Union[list[int], None] = None
    tile: Union[list[int], None] = None
    by: Union[Literal["key_importance"], None] = None
    segment: Union[int, None] = Field(default=None, ge=1)


class Reuse(_Strict):
    from_: Union[str, int, None] = Field(default=None, alias="from")
    refresh_every: Union[int, None] = Field(default=None, ge=1)
    dense_first: Union[int, None] = Field(default=None, ge=0)


class BlockSize(_Strict):
    q: int = Field(ge=16)
    kv: int = Field(ge=16)


class Rule(_Strict):
    name: Union[str, None] = None
    where: Where = Where()
    mask: Any = "full"
    heads: Union[dict[Union[str, int], Any], None] = None
    permute: Union[Permute, None] = None
    block_size: Union[int, BlockSize, None] = None
    reuse: Union[Reuse, None] = None


class Spec(_Strict):
    attncc: Literal[1]
    name: str = "spec"
    description: Union[str, None] = None
    block_size: Union[int, BlockSize] = 64
    masks: dict[str, Any] = {}
    rules: list[Rule] = Field(min_length=1)

    _source: str = PrivateAttr(default="<spec>")
    _lines: dict = PrivateAttr(default_factory=dict)
    _named: dict = PrivateAttr(default_factory=dict)
    _rule_masks: list = PrivateAttr(default_factory=list)

    @field_validator("block_size", mode="after")
    @classmethod
    def _block_pow2(cls, v):
        for b in ((v,) if isinstance(v, int) else (v.q, v.kv)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"block sizes must be powers of two >= 16, got {b}")
        return v

    # -- errors -------------------------------------------------------------------------------
    def error(self, message: str, path: Path_ = ()) -> SpecError:
        """A SpecError located at ``path`` (the nearest recorded ancestor gives the line)."""
        return _error(message, self._source, self._lines, path)

    # -- resolution -----------------------------------------------------------------------------
    def block_sizes(self, rule_index: int | None = None) -> tuple[int, int]:
        bs = self.block_size
        if rule_index is not None and self.rules[rule_index].block_size is not None:
            bs = self.rules[rule_index].block_size
        return (bs, bs) if isinstance(bs, int) else (bs.q, bs.kv)

    def rule_name(self, index: int) -> str:
        return self.rules[index].name or f"rules[{index}]"

    def match(self, layer: int, module: str = "") -> int | None:
        """Index of the first rule whose ``where`` matches, or None."""
        for i, rule in enumerate(self.rules):
            if _layer_matches(rule.where.layers, layer) and (
                rule.where.module is None or fnmatch.fnmatchcase(module, rule.where.module)
            ):
                return i
        return None

    def head_policy(self, rule_index: int, num_heads: int) -> tuple[tuple[M.Mask, ...], tuple[int, ...]]:
        """(distinct mask programs, program index per head) for a rule applied to ``num_heads``."""
        base, overrides = self._rule_masks[rule_index]
        per_head: list[M.Mask] = [base] * num_heads
        for key, heads, mask in overrides:
            for h in heads:
                if h >= num_heads:
                    raise self.error(f"head {h} is out of range: the attention has {num_heads} heads "
                                     f"(0-{num_heads - 1})", ("rules", rule_index, "heads", key, "__key__"))
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
        if p is None or p.grid is None:
            return None
        return TilePermutation(tuple(p.grid), tuple(p.tile))  # type: ignore[arg-type]

    def mask_for(self, layer: int = 0, module: str = "", head: int = 0) -> M.Mask | None:
        i = self.match(layer, module)
        if i is None:
            return None
        progs, idx = self.head_policy(i, head + 1)
        return progs[idx[head]]


def _error(message: str, source: str, lines: dict, path: Path_) -> SpecError:
    p = tuple(path)
    while p and p not in lines:
        p = p[:-1]
    line, col = lines.get(p, (None, None))
    clean = tuple(x for x in path if x != "__key__")
    return SpecError(message, source, line, col, clean)


def parse_layers(value: Any) -> Any:
    """Validate a layer selector; returns a predicate-friendly normal form."""
    if value is None or isinstance(value, (EveryLayers, int)):
        if isinstance(value, int) and value < 0:
            raise ValueError("layer indices are >= 0")
        return value
    if isinstance(value, list):
        if any(x < 0 for x in value):
            raise ValueError("layer indices are >= 0")
        return value
    return parse_index_set(value, "layer")


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d*)\s*)?$")


def parse_index_set(text: str, what: str) -> list[tuple[int, int | None]]:
    """'0-1', '3,7,11', '2-' -> inclusive ranges (None = open end)."""
    out: list[tuple[int, int | None]] = []
    for part in str(text).split(","):
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"malformed {what} range '{part.strip()}' in '{text}': expected forms like "
                             f"'3', '0-1', '3,7,11' or '2-'")
        lo = int(m.group(1))
        hi = None if m.group(2) == "" else int(m.group(2)) if m.group(2) is not None else lo
        if hi is not None and hi < lo:
            raise ValueError(f"{what} range '{part.strip()}' ends before it starts")
        out.append((lo, hi))
    return out


def _layer_matches(sel: Any, layer: int) -> bool:
    if sel is None:
        return True
    if isinstance(sel, int):
        return layer == sel
    if isinstance(sel, EveryLayers):
        return layer >= sel.offset and (layer - sel.offset) % sel.every == 0
    if isinstance(sel, list) and all(isinstance(x, int) for x in sel):
        return layer in sel
    return any(lo <= layer and (hi is None or layer <= hi) for lo, hi in parse_index_set(sel, "layer"))


_SCALAR_PRIMITIVES = {"full": M.Full, "causal": M.Causal}
_INT_PRIMITIVES = {"sink": M.Sink, "prefix": M.Prefix, "global": M.Global, "chunk": M.Chunk,
                   "block_causal": M.BlockCausal, "strided": M.Strided, "power": M.Power}
_SELECTOR_KEYS = {
    "topk": {"k", "score", "stride", "pool", "block", "min_blocks"},
    "threshold": {"tau", "score", "stride", "pool", "block", "min_blocks"},
}


def _need_int(v: Any, path: Path_, what: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise M.MaskError(f"{what} must be an integer >= {minimum}, got {v!r}", path)
    if v < minimum:
        raise M.MaskError(f"{what} must be >= {minimum}, got {v}", path)
    return v


def _need_triple(v: Any, path: Path_, what: str, minimum: int) -> tuple[int, int, int]:
    if not isinstance(v, list) or len(v) != 3:
        raise M.MaskError(f"{what} must be a list of three integers, got {v!r}", path)
    return tuple(_need_int(x, path + (i,), what, minimum) for i, x in enumerate(v))  # type: ignore[return-value]


def parse_mask(node: Any, named: dict[str, M.Mask], path: Path_ = ()) -> M.Mask:
    """Build a mask from its YAML form, raising MaskError with the key path at fault."""
    known = sorted(set(M.PRIMITIVES) | set(named))
    if isinstance(node, str):
        if node in named:
            return named[node]
        if node in _SCALAR_PRIMITIVES:
            return _SCALAR_PRIMITIVES[node]()
        if node in M.PRIMITIVES:
            raise M.MaskError(f"'{node}' needs an argument, e.g. {{{node}: ...}}", path)
        raise M.MaskError(f"unknown mask '{node}'{_suggest(node, known)}; expected a primitive "
                          f"({', '.join(M.PRIMITIVES)}) or a name from `masks`", path)
    if not isinstance(node, dict) or len(node) != 1:
        raise M.MaskError(f"a mask is a name or a mapping with exactly one key, got {node!r}", path)
    (key, arg), = node.items()
    p = path + (key,)
    if key in _INT_PRIMITIVES:
        return _INT_PRIMITIVES[key](_need_int(arg, p, key))
    if key == "window":
        if isinstance(arg, dict):
            extra = set(arg) - {"before", "after"}
            if extra:
                k = sorted(extra)[0]
                raise M.MaskError(f"unknown key '{k}'{_suggest(k, ['before', 'after'])}; window takes "
                                  f"'before' and 'after'", p + (k,))
            before = _need_int(arg.get("before", 0), p + ("before",), "window.before", 0)
            after = _need_int(arg.get("after", 0), p + ("after",), "window.after", 0)
            return M.Window(before, after)
        return M.Window(_need_int(arg, p, "window") - 1, 0)
    if key in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            raise M.MaskError(f"'{key}' takes a non-empty list of masks", p)
        items = tuple(parse_mask(x, named, p + (i,)) for i, x in enumerate(arg))
        return M.All(items) if key == "all" else M.Any_(items)
    if key == "not":
        return M.Not(parse_mask(arg, named, p))
    if key == "random_blocks":
        if not isinstance(arg, dict):
            raise M.MaskError("random_blocks takes {n: N, seed: S, block: B}", p)
        extra = set(arg) - {"n", "seed", "block"}
        if extra:
            k = sorted(extra)[0]
            raise M.MaskError(f"unknown key '{k}'{_suggest(k, ['n', 'seed', 'block'])}", p + (k,))
        return M.RandomBlocks(_need_int(arg.get("n"), p + ("n",), "random_blocks.n"),
                              _need_int(arg.get("seed", 0), p + ("seed",), "random_blocks.seed", 0),
                              _need_int(arg.get("block", 64), p + ("block",), "random_blocks.block"))
    if key == "tile3d":
        if not isinstance(arg, dict) or set(arg) - {"grid", "window"} or "grid" not in arg or "window" not in arg:
            bad = sorted(set(arg) - {"grid", "window"}) if isinstance(arg, dict) else []
            hint = _suggest(bad[0], ["grid", "window"]) if bad else ""
            raise M.MaskError(f"tile3d takes exactly {{grid: [T, H, W], window: [t, h, w]}}{hint}",
                              p + ((bad[0],) if bad else ()))
        return M.Tile3D(_need_triple(arg["grid"], p + ("grid",), "tile3d.grid", 1),
                        _need_triple(arg["window"], p + ("window",), "tile3d.window", 0))
    if key in _SELECTOR_KEYS:
        if not isinstance(arg, dict):
            raise M.MaskError(f"{key} takes a mapping of parameters ({', '.join(sorted(_SELECTOR_KEYS[key]))})", p)
        extra = set(arg) - _SELECTOR_KEYS[key]
        if extra:
            k = sorted(extra)[0]
            raise M.MaskError(f"unknown key '{k}'{_suggest(k, _SELECTOR_KEYS[key])}", p + (k,))
        score = arg.get("score", "mean_pool")
        if score not in M.SELECTOR_SCORES:
            raise M.MaskError(f"unknown score '{score}'{_suggest(score, M.SELECTOR_SCORES)}; expected one of "
                              f"{', '.join(M.SELECTOR_SCORES)}", p + ("score",))
        if key == "topk":
            _need_int(arg.get("k"), p + ("k",), "topk.k")
        else:
            tau = arg.get("tau")
            if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau <= 1:
                raise M.MaskError(f"threshold.tau must be a number in (0, 1], got {tau!r}", p + ("tau",))
        return M.Selector(key, tuple(sorted(arg.items())))
    raise M.MaskError(f"unknown mask '{key}'{_suggest(key, known)}; expected one of {', '.join(M.PRIMITIVES)}", p)


def _compile(spec: Spec) -> None:
    named: dict[str, M.Mask] = {}
    lines, src = spec._lines, spec._source

    def mask(node, path):
        try:
            return parse_mask(node, named, path)
        except M.MaskError as e:
            raise _error(e.message, src, lines, path + e.path if not e.path[:len(path)] == path else e.path) from None

    for name, node in spec.masks.items():
        if name in M.PRIMITIVES:
            raise _error(f"mask name '{name}' shadows a primitive; choose another name", src, lines,
                         ("masks", name, "__key__"))
        named[name] = mask(node, ("masks", name))
    rule_masks = []
    for i, rule in enumerate(spec.rules):
        try:
            parse_layers(rule.where.layers)
        except ValueError as e:
            raise _error(str(e), src, lines, ("rules", i, "where", "layers")) from None
        base = mask(rule.mask, ("rules", i, "mask"))
        overrides = []
        for key, node in (rule.heads or {}).items():
            try:
                heads = sorted({h for lo, hi in parse_index_set(str(key), "head") for h in range(lo, (hi if hi is not None else lo) + 1)})
                if any(hi is None for _, hi in parse_index_set(str(key), "head")):
                    raise ValueError(f"head range '{key}' must have an end")
            except ValueError as e:
                raise _error(str(e), src, lines, ("rules", i, "heads", key, "__key__")) from None
            overrides.append((key, heads, mask(node, ("rules", i, "heads", key))))
        if rule.permute is not None:
            p = rule.permute
            base_path = ("rules", i, "permute")
            if p.grid is not None or p.tile is not None:
                if p.grid is None or p.tile is None:
                    raise _error("a static permutation needs both 'grid' and 'tile'", src, lines, base_path)
                try:
                    g = _need_triple(p.grid, (), "permute.grid", 1)
                    t = _need_triple(p.tile, (), "permute.tile", 1)
                except M.MaskError as e:
                    raise _error(e.message, src, lines, base_path) from None
                for axis, (gg, tt) in enumerate(zip(g, t)):
                    if gg % tt:
                        raise _error(f"permute.tile[{axis}] = {tt} does not divide grid[{axis}] = {gg}", src,
                                     lines, base_path + ("tile", axis))
                if p.by is not None:
                    raise _error("use either a static grid/tile permutation or 'by', not both", src, lines,
                                 base_path)
            elif p.by is None:
                raise _error("permute needs {grid, tile} or {by, segment}", src, lines, base_path)
        rule_masks.append((base, overrides))
    spec._named = named
    spec._rule_masks = rule_masks


def load_spec(src: Any) -> Spec:
    """Load a spec from a path, ``pathlib.Path``, YAML text, dict or ``Spec``.

    Every problem raises :class:`SpecError` naming the file, line, column and key path.
    """
    if isinstance(src, Spec):
        return src
    source, lines = "<dict>", {}
    if isinstance(src, dict):
        data = src
    else:
        text: str
        if isinstance(src, pathlib.Path) or (isinstance(src, str) and "\n" not in src and
                                             (src.endswith((".yaml", ".yml")) or os.path.exists(src))):
            source = str(src)
            try:
                text = pathlib.Path(src).read_text()
            except OSError as e:
                raise SpecError(f"cannot read spec file: {e.strerror}", source) from None
        elif isinstance(src, str):
            source, text = "<string>", src
        else:
            raise SpecError(f"a spec is a path, YAML text, dict or attncc.Spec, got {type(src).__name__}")
        try:
            node = yaml.compose(text, Loader=_LineLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise SpecError(f"YAML syntax error: {e.problem or e.context}", source,
                            mark.line + 1 if mark else None, mark.column + 1 if mark else None) from None
        except yaml.YAMLError as e:
            raise SpecError(f"YAML error: {e}", source) from None
        if node is None:
            raise SpecError("the spec is empty; expected a mapping starting with 'attncc: 1'", source)
        _positions(node, (), lines, source)
        try:
            data = yaml.load(text, Loader=_LineLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise SpecError(f"YAML error: {e.problem or e.context} (only plain YAML is allowed: no Python tags)",
                            source, mark.line + 1 if mark else None, mark.column + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise _error(f"a spec is a mapping with 'attncc: 1', 'rules', ...; got a {type(data).__name__}",
                     source, lines, ())
    if "attncc" not in data:
        raise _error("missing the format version 'attncc: 1' at the top", source, lines, ())
    if data.get("attncc") != 1:
        raise _error(f"unsupported spec version {data.get('attncc')!r}; this attncc reads 'attncc: 1'", source,
                     lines, ("attncc",))
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e, data, source, lines) from None
    spec._source, spec._lines = source, lines
    _compile(spec)
    return spec


_FIELDS: dict[str, set[str]] = {}


def _model_fields(model) -> set[str]:
    return {(f.alias or n) for n, f in model.model_fields.items()}


def _from_validation(err: ValidationError, data: Any, source: str, lines: dict) -> SpecError:
    e = err.errors()[0]
    loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x[:1].isupper() and "[" in x) and
                x not in ("int", "str", "list[int]", "EveryLayers", "BlockSize", "dict[str,any]"))
    # Walk the data to keep only the path that exists (pydantic adds union branch names)
    path: list = []
    cur = data
    for x in loc:
        if isinstance(cur, dict) and x in cur:
            path.append(x)
            cur = cur[x]
        elif isinstance(cur, list) and isinstance(x, int) and x < len(cur):
            path.append(x)
            cur = cur[x]
        elif e["type"] == "extra_forbidden" and x == loc[-1]:
            path.append(x)
    if e["type"] == "extra_forbidden":
        key = path[-1]
        parent = data
        for x in path[:-1]:
            parent = parent[x]
        allowed = _allowed_keys(path[:-1])
        hint = _suggest(key, allowed)
        msg = f"unknown key '{key}'{hint}; expected one of: {', '.join(sorted(allowed))}"
        return _error(msg, source, lines, tuple(path) + ("__key__",))
    if e["type"] == "missing":
        return _error(f"missing required key '{loc[-1]}'", source, lines, tuple(path))
    return _error(f"{e['msg']} (got {e.get('input')!r})", source, lines, tuple(path))


def _allowed_keys(parent: list) -> set[str]:
    if not parent:
        return _model_fields(Spec)
    if parent[0] == "rules" and len(parent) == 2:
        return _model_fields(Rule)
    if parent[0] == "rules" and len(parent) >= 3:
        sub = {"where": Where, "permute": Permute, "reuse": Reuse, "block_size": BlockSize}.get(parent[2])
        if sub is not None and len(parent) == 3:
            return _model_fields(sub)
        if parent[2] == "where" and len(parent) == 4:
            return _model_fields(EveryLayers)
    if parent[0] == "block_size":
        return _model_fields(BlockSize)
    return set()


@dataclass(frozen=True)
class ResolvedPolicy:
    """What a rule means for one attention site."""

    rule_index: int
    rule: str
    programs: tuple[M.Mask, ...]
    head_to_program: tuple[int, ...]
    permute: TilePermutation | None
    block_q: int
    block_kv: int


def resolve(spec: Spec, layer: int, module: str, num_heads: int) -> ResolvedPolicy | None:
    i = spec.match(layer, module)
    if i is None:
        return None
    programs, index = spec.head_policy(i, num_heads)
    bq, bkv = spec.block_sizes(i)
    return ResolvedPolicy(i, spec.rule_name(i), programs, index, spec.permutation(i), bq, bkv)
