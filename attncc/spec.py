"""Spec format v1: YAML -> validated ``Spec`` with line-accurate ``SpecError``s."""

from __future__ import annotations

import difflib
import fnmatch
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, WithJsonSchema, field_validator

from attncc import masks as M
from attncc.permute import TilePermutation

Path_ = tuple[str | int, ...]


class SpecError(ValueError):
    """A spec is invalid. The message names the file, line/column, key path and what was expected."""

    def __init__(
        self, message: str, source: str = "<spec>", line: int | None = None, column: int | None = None, path: Path_ = ()
    ):
        self.message, self.source, self.line, self.column, self.path = message, source, line, column, path
        where = source
        if line is not None:
            where += f":{line}" + (f":{column}" if column is not None else "")
        key = "/".join(str(p) for p in path)
        super().__init__(f"{where}: {('at ' + key + ': ') if key else ''}{message}")


def _suggest(word: str | int, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the position of every node by key path."""


#: most YAML nodes a spec may hold (aliases count each time they are used)
_MAX_NODES = 100_000


def _line_key(path: Path_) -> tuple[str, ...]:
    """Key of the position table: mapping keys and list indices as strings (YAML keys such
    as ``0:`` load as ints but compose as strings)."""
    return tuple(str(x) for x in path)


def _yaml_error(e: yaml.MarkedYAMLError, template: str, source: str) -> SpecError:
    """A PyYAML error as a SpecError at the line and column PyYAML marked."""
    mark = e.problem_mark or e.context_mark
    return SpecError(
        template.format(e.problem or e.context),
        source,
        mark.line + 1 if mark else None,
        mark.column + 1 if mark else None,
    )


def _positions(
    node: yaml.Node,
    path: Path_,
    out: dict[tuple[str, ...], tuple[int, int]],
    source: str,
    active: frozenset[int] = frozenset(),
) -> None:
    """Record (line, column) of every node and key; reject duplicate keys, alias cycles and
    alias bombs."""
    if id(node) in active:
        raise SpecError(
            "a YAML alias refers to a node that contains it (a cycle)",
            source,
            node.start_mark.line + 1,
            node.start_mark.column + 1,
            path,
        )
    if len(out) > _MAX_NODES:
        raise SpecError(
            f"the spec expands to more than {_MAX_NODES} YAML nodes (alias expansion?)",
            source,
            node.start_mark.line + 1,
            node.start_mark.column + 1,
            path,
        )
    out.setdefault(_line_key(path), (node.start_mark.line + 1, node.start_mark.column + 1))
    inner = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            if key in seen:
                raise SpecError(
                    f"duplicate key '{key}'", source, k.start_mark.line + 1, k.start_mark.column + 1, path + (key,)
                )
            seen.add(key)
            out.setdefault(_line_key(path + (key, "__key__")), (k.start_mark.line + 1, k.start_mark.column + 1))
            _positions(v, path + (key,), out, source, inner)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _positions(v, path + (i,), out, source, inner)


#: a mask node: validated by :func:`parse_mask`, described in the schema by ``$defs/Mask``
MaskNode = Annotated[Any, WithJsonSchema({"x-attncc-mask": True})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EveryLayers(_Strict):
    every: int = Field(ge=1)
    offset: int = Field(default=0, ge=0)


class Where(_Strict):
    layers: int | str | list[int] | EveryLayers | None = Field(
        default=None, description="layer group: 3, '0-1', '3,7,11', '2-' (open end), [1, 2] or {every: N, offset: K}"
    )
    module: str | None = Field(default=None, description="glob on the module path, e.g. '*.self_attn'")


class Permute(_Strict):
    grid: list[int] | None = None
    tile: list[int] | None = None
    by: Literal["key_importance"] | None = None
    segment: int | None = Field(default=None, ge=1)


class Reuse(_Strict):
    from_: str | int | None = Field(default=None, alias="from")
    refresh_every: int | None = Field(default=None, ge=1)
    dense_first: int | None = Field(default=None, ge=0)


def _check_block(b: int) -> int:
    if b < 16 or b & (b - 1):
        raise ValueError(f"block sizes must be powers of two >= 16, got {b}")
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
    heads: dict[str | int, MaskNode] | None = Field(
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


class Spec(_Strict):
    attncc: Literal[1] = Field(description="format version")
    name: str = "spec"
    description: str | None = None
    block_size: int | BlockSize = 64
    masks: dict[str, MaskNode] = Field(default={}, description="named masks, usable by name in later masks and rules")
    rules: list[Rule] = Field(min_length=1, description="ordered; the first rule whose `where` matches a site wins")

    _source: str = PrivateAttr(default="<spec>")
    _lines: dict = PrivateAttr(default_factory=dict)
    _named: dict = PrivateAttr(default_factory=dict)
    _rule_masks: list = PrivateAttr(default_factory=list)

    @field_validator("block_size", mode="after")
    @classmethod
    def _block_pow2(cls, v):
        return _check_block(v) if isinstance(v, int) else v

    # -- errors -------------------------------------------------------------------------------
    def error(self, message: str, path: Path_ = ()) -> SpecError:
        """A SpecError located at ``path`` (the nearest recorded ancestor gives the line)."""
        return _error(message, self._source, self._lines, path)

    # -- resolution -----------------------------------------------------------------------------
    def block_sizes(self, rule_index: int | None = None) -> tuple[int, int]:
        bs = self.block_size
        rule_bs = None if rule_index is None else self.rules[rule_index].block_size
        if rule_bs is not None:
            bs = rule_bs
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
    p = _line_key(path)
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
            raise ValueError(
                f"malformed {what} range '{part.strip()}' in '{text}': expected forms like '3', '0-1', '3,7,11' or '2-'"
            )
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
_INT_PRIMITIVES = {
    "sink": M.Sink,
    "prefix": M.Prefix,
    "global": M.Global,
    "chunk": M.Chunk,
    "block_causal": M.BlockCausal,
    "strided": M.Strided,
    "power": M.Power,
}
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
        names = f" ({', '.join(named)})" if named else " (none defined above this point)"
        raise M.MaskError(
            f"unknown mask '{node}'{_suggest(node, known)}; expected a primitive "
            f"({', '.join(M.PRIMITIVES)}) or a name from `masks`{names}",
            path,
        )
    if not isinstance(node, dict) or len(node) != 1:
        raise M.MaskError(f"a mask is a name or a mapping with exactly one key, got {node!r}", path)
    ((key, arg),) = node.items()
    p = path + (key,)
    if key in _INT_PRIMITIVES:
        return _INT_PRIMITIVES[key](_need_int(arg, p, key))
    if key == "window":
        if isinstance(arg, dict):
            extra = set(arg) - {"before", "after"}
            if extra:
                k = sorted(extra)[0]
                raise M.MaskError(
                    f"unknown key '{k}'{_suggest(k, ['before', 'after'])}; window takes 'before' and 'after'", p + (k,)
                )
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
        return M.RandomBlocks(
            _need_int(arg.get("n"), p + ("n",), "random_blocks.n"),
            _need_int(arg.get("seed", 0), p + ("seed",), "random_blocks.seed", 0),
            _need_int(arg.get("block", 64), p + ("block",), "random_blocks.block"),
        )
    if key == "tile3d":
        if not isinstance(arg, dict) or set(arg) - {"grid", "window"} or "grid" not in arg or "window" not in arg:
            bad = sorted(set(arg) - {"grid", "window"}) if isinstance(arg, dict) else []
            hint = _suggest(bad[0], ["grid", "window"]) if bad else ""
            raise M.MaskError(
                f"tile3d takes exactly {{grid: [T, H, W], window: [t, h, w]}}{hint}", p + ((bad[0],) if bad else ())
            )
        return M.Tile3D(
            _need_triple(arg["grid"], p + ("grid",), "tile3d.grid", 1),
            _need_triple(arg["window"], p + ("window",), "tile3d.window", 0),
        )
    if key in _SELECTOR_KEYS:
        if not isinstance(arg, dict):
            raise M.MaskError(f"{key} takes a mapping of parameters ({', '.join(sorted(_SELECTOR_KEYS[key]))})", p)
        extra = set(arg) - _SELECTOR_KEYS[key]
        if extra:
            k = sorted(extra)[0]
            raise M.MaskError(f"unknown key '{k}'{_suggest(k, _SELECTOR_KEYS[key])}", p + (k,))
        score = arg.get("score", "mean_pool")
        if score not in M.SELECTOR_SCORES:
            raise M.MaskError(
                f"unknown score '{score}'{_suggest(score, M.SELECTOR_SCORES)}; expected one of "
                f"{', '.join(M.SELECTOR_SCORES)}",
                p + ("score",),
            )
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
            raise _error(e.message, src, lines, path + e.path if not e.path[: len(path)] == path else e.path) from None

    for name, node in spec.masks.items():
        if name in M.PRIMITIVES:
            raise _error(
                f"mask name '{name}' shadows a primitive; choose another name", src, lines, ("masks", name, "__key__")
            )
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
                ranges = parse_index_set(str(key), "head")
                if any(hi is None for _, hi in ranges):
                    raise ValueError(f"head range '{key}' must have an end, e.g. '4-7'")
                heads = sorted({h for lo, hi in ranges for h in range(lo, hi + 1)})  # type: ignore[operator]
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
                        raise _error(
                            f"permute.tile[{axis}] = {tt} does not divide grid[{axis}] = {gg}",
                            src,
                            lines,
                            base_path + ("tile", axis),
                        )
                if p.by is not None:
                    raise _error("use either a static grid/tile permutation or 'by', not both", src, lines, base_path)
            elif p.by is None:
                raise _error("permute needs {grid, tile} or {by, segment}", src, lines, base_path)
        rule_masks.append((base, overrides))
    spec._named = named
    spec._rule_masks = rule_masks


def load_spec(src: Any) -> Spec:
    """Load a spec from a path, ``pathlib.Path``, YAML text, dict or ``Spec``.

    Every problem raises :class:`SpecError` naming the file, line, column and key path;
    no other exception escapes.
    """
    if isinstance(src, Spec):
        return src
    source = "<spec>"
    try:
        source, data, lines = _read(src)
        return _load(data, source, lines)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError("the spec is nested too deeply", source) from None
    except Exception as e:  # a safety net: report, never crash, on inputs the checks above missed
        raise SpecError(f"could not read the spec ({type(e).__name__}: {e})", source) from e


def _read(src: Any) -> tuple[str, Any, dict]:
    """(source name, plain data, positions) from a path, YAML text or dict."""
    if isinstance(src, dict):
        return "<dict>", src, {}
    if isinstance(src, pathlib.Path) or (
        isinstance(src, str) and "\n" not in src and (src.endswith((".yaml", ".yml")) or os.path.exists(src))
    ):
        source = str(src)
        try:
            text = pathlib.Path(src).read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError(f"cannot read spec file: {e.strerror or e}", source) from None
        except UnicodeDecodeError as e:
            raise SpecError(f"the spec file is not UTF-8 text ({e.reason} at byte {e.start})", source) from None
    elif isinstance(src, str):
        source, text = "<string>", src
    else:
        raise SpecError(f"a spec is a path, YAML text, dict or attncc.Spec, got {type(src).__name__}")
    lines: dict = {}
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, "YAML syntax error: {}", source) from None
    except yaml.YAMLError as e:
        raise SpecError(f"YAML error: {e}", source) from None
    if node is None:
        raise SpecError("the spec is empty; expected a mapping starting with 'attncc: 1'", source)
    _positions(node, (), lines, source)
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, "YAML error: {} (only plain YAML is allowed: no Python tags)", source) from None
    return source, data, lines


def _load(data: Any, source: str, lines: dict) -> Spec:
    if not isinstance(data, dict):
        raise _error(
            f"a spec is a mapping with 'attncc: 1', 'rules', ...; got a {type(data).__name__}", source, lines, ()
        )
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise _error(f"top-level keys are names, got {bad_keys[0]!r}", source, lines, (bad_keys[0], "__key__"))
    if "attncc" not in data:
        raise _error("missing the format version 'attncc: 1' at the top", source, lines, ())
    version = data["attncc"]
    if type(version) is not int or version != 1:
        raise _error(f"unsupported spec version {version!r}; this attncc reads 'attncc: 1'", source, lines, ("attncc",))
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e, data, source, lines) from None
    spec._source, spec._lines = source, lines
    _compile(spec)
    return spec


def _model_fields(model) -> set[str]:
    return {(f.alias or n) for n, f in model.model_fields.items()}


def _data_path(data: Any, loc: tuple) -> list:
    """The part of a pydantic error location that exists in the data: pydantic inserts union
    branch names ('int', 'EveryLayers', ...) that are skipped, and a missing key is not there."""
    path: list = []
    cur = data
    for x in loc:
        if isinstance(cur, dict) and x in cur:
            cur = cur[x]
            path.append(x)
        elif isinstance(cur, list) and isinstance(x, int) and 0 <= x < len(cur):
            cur = cur[x]
            path.append(x)
    return path


_ERROR_RANK = {"extra_forbidden": 0, "missing": 1}


def _from_validation(err: ValidationError, data: Any, source: str, lines: dict) -> SpecError:
    """The most specific pydantic error as a located SpecError: the deepest location in the
    data wins; among equals, unknown keys and missing keys first (they come with hints)."""
    candidates: list[tuple[int, int, int, list, Any]] = []
    for e in err.errors():
        path = _data_path(data, tuple(e["loc"]))
        candidates.append((-len(path), _ERROR_RANK.get(e["type"], 2), len(candidates), path, e))
    _, _, _, path, e = min(candidates, key=lambda c: c[:3])
    if e["type"] == "extra_forbidden":
        key = e["loc"][-1]
        parent = path[:-1] if path and path[-1] == key else path
        allowed = _allowed_keys(parent)
        hint = _suggest(key, allowed)
        expected = f"; expected one of: {', '.join(sorted(allowed))}" if allowed else ""
        return _error(f"unknown key '{key}'{hint}{expected}", source, lines, tuple(parent) + (key, "__key__"))
    if e["type"] == "missing":
        return _error(f"missing required key '{e['loc'][-1]}'", source, lines, tuple(path))
    got = e.get("input")
    got_text = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    msg = e["msg"].removeprefix("Value error, ")
    return _error(f"{msg} (got {got_text})", source, lines, tuple(path))


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


def check_executable(spec: Spec, rule_index: int) -> None:
    """Raise a SpecError naming the rule if it uses a construct spec v1 validates but this
    attncc cannot run yet: a data-dependent selector (``topk``/``threshold``) that
    :func:`attncc.selection.selector_problem` rejects, or a run-time permutation
    (``permute.by``) or ``reuse`` that :func:`attncc.selection.runtime_problem` rejects.
    Binding such a rule must fail at compile time; it is never run dense instead."""
    from attncc.selection import runtime_problem, selector_problem, selectors_of

    rule = spec.rules[rule_index]
    name = spec.rule_name(rule_index)
    base, overrides = spec._rule_masks[rule_index]
    found: list[tuple[str, tuple]] = []
    block_q, block_kv = spec.block_sizes(rule_index)
    permuted = rule.permute is not None and rule.permute.grid is not None
    for mask, path in [(base, ("rules", rule_index, "mask"))] + [
        (m, ("rules", rule_index, "heads", key)) for key, _, m in overrides
    ]:
        # selectors run (attncc.selection) unless their combination or parameters cannot
        problem = selector_problem([mask], block_q, block_kv, permuted) if mask.is_dynamic else None
        if problem is not None:
            found.append((f"the data-dependent selector '{selectors_of(mask)[0].name}' ({problem})", path))
    # reuse across layers/calls and run-time permutations run (attncc.selection.runtime_problem)
    runtime = runtime_problem(spec, rule_index)
    if runtime is not None:
        found.append(runtime)
    if found:
        what, path = found[0]
        raise spec.error(
            f"rule '{name}' uses {what}, which spec v1 accepts but this attncc cannot execute yet; "
            f"remove it or restrict the rule's 'where' so no attention binds to it (attncc never "
            f"runs such a rule dense instead)",
            path,
        )


def resolve(spec: Spec, layer: int, module: str, num_heads: int, check: bool = True) -> ResolvedPolicy | None:
    """The policy of the first rule matching ``layer``/``module`` (None: no rule, the site
    stays as it is). ``check`` raises SpecError for rules that cannot execute yet
    (see :func:`check_executable`)."""
    i = spec.match(layer, module)
    if i is None:
        return None
    if check:
        check_executable(spec, i)
    programs, index = spec.head_policy(i, num_heads)
    bq, bkv = spec.block_sizes(i)
    return ResolvedPolicy(i, spec.rule_name(i), programs, index, spec.permutation(i), bq, bkv)


def _obj(key: str, arg: dict, description: str) -> dict:
    return {
        "type": "object",
        "description": description,
        "properties": {key: arg},
        "required": [key],
        "additionalProperties": False,
    }


def _params(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


_POS = {"type": "integer", "minimum": 1}
_NONNEG = {"type": "integer", "minimum": 0}
_TRIPLE_POS = {"type": "array", "items": _POS, "minItems": 3, "maxItems": 3}
_TRIPLE_NONNEG = {"type": "array", "items": _NONNEG, "minItems": 3, "maxItems": 3}
_SELECTOR_COMMON = {
    "score": {"enum": list(M.SELECTOR_SCORES), "default": "mean_pool"},
    "stride": _POS,
    "pool": _POS,
    "block": _POS,
    "min_blocks": _NONNEG,
}

#: JSON-schema definitions of mask nodes (one entry per construct; docs/spec.md has the predicates)
MASK_DEFS: dict[str, dict] = {
    "Mask": {
        "description": "A mask: a predicate of (head, q, kv) over token positions. A string is 'full', "
        "'causal' or the name of a mask defined earlier under `masks`; a mapping has exactly "
        "one key naming the construct.",
        "anyOf": [
            {"type": "string", "description": "'full' (all pairs), 'causal' (kv <= q) or a named mask"},
            _obj(
                "window",
                {"anyOf": [_POS, _params({"before": _NONNEG, "after": _NONNEG}, [])]},
                "{window: N}: q-N < kv <= q; {window: {before: A, after: B}}: q-A <= kv <= q+B",
            ),
            _obj("sink", _POS, "kv < N"),
            _obj("prefix", _POS, "kv < N (bidirectional prefix)"),
            _obj("global", _POS, "q < N or kv < N"),
            _obj("chunk", _POS, "q // B == kv // B"),
            _obj("block_causal", _POS, "kv // B <= q // B"),
            _obj("strided", _POS, "(q - kv) % S == 0"),
            _obj("power", _POS, "d = q - kv: 0 <= d < L or d is a power of two"),
            _obj(
                "random_blocks",
                _params({"n": _POS, "seed": _NONNEG, "block": _POS}, ["n"]),
                "query block q//B sees n hashed kv blocks of size B (default 64)",
            ),
            _obj(
                "tile3d",
                _params({"grid": _TRIPLE_POS, "window": _TRIPLE_NONNEG}, ["grid", "window"]),
                "row-major T x H x W tokens: |dt| <= wt, |dh| <= wh, |dw| <= ww",
            ),
            _obj("all", {"type": "array", "items": {"$ref": "#/$defs/Mask"}, "minItems": 1}, "intersection"),
            _obj("any", {"type": "array", "items": {"$ref": "#/$defs/Mask"}, "minItems": 1}, "union"),
            _obj("not", {"$ref": "#/$defs/Mask"}, "complement"),
            _obj(
                "topk",
                _params({"k": _POS, **_SELECTOR_COMMON}, ["k"]),
                "data-dependent: the k highest-scoring kv blocks per query block (validated, not executable yet)",
            ),
            _obj(
                "threshold",
                _params({"tau": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, **_SELECTOR_COMMON}, ["tau"]),
                "data-dependent: the fewest kv blocks covering tau of the score mass (validated, not executable yet)",
            ),
        ],
    },
}


def json_schema() -> dict:
    """The JSON schema of spec format v1, masks described recursively (``$defs/Mask``)."""

    def link(node: Any) -> Any:
        if isinstance(node, dict):
            if node.pop("x-attncc-mask", False):
                node["$ref"] = "#/$defs/Mask"
            return {k: link(v) for k, v in node.items()}
        if isinstance(node, list):
            return [link(v) for v in node]
        return node

    schema = link(Spec.model_json_schema(by_alias=True))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "attncc spec v1"
    schema.setdefault("$defs", {}).update(MASK_DEFS)
    return schema
