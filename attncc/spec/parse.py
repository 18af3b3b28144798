"""Spec nodes -> IR: masks through the primitive registry, layer and head selectors, permutations."""

from __future__ import annotations

from typing import Any

from attncc.ir import masks as M
from attncc.ir.masks.args import need_triple, suggest
from attncc.spec.errors import Path, error_at
from attncc.spec.models import CompiledRule, EveryLayers, Spec
from attncc.spec.ranges import parse_index_set


def parse_mask(node: Any, named: dict[str, M.Mask], path: Path = ()) -> M.Mask:
    """Build a mask from its YAML form, raising MaskError with the key path at fault."""

    def child(x: Any, p: Path) -> M.Mask:
        return parse_mask(x, named, p)

    if isinstance(node, str):
        if node in named:
            return named[node]
        prim = M.PRIMITIVES.get(node)
        if prim is not None and prim.bare:
            return prim.parse(None, path, child)
        if prim is not None:
            raise M.MaskError(f"'{node}' needs an argument, e.g. {{{node}: ...}}", path)
        known = sorted(set(M.PRIMITIVES) | set(named))
        names = f" ({', '.join(named)})" if named else " (none defined above this point)"
        raise M.MaskError(
            f"unknown mask '{node}'{suggest(node, known)}; expected a primitive "
            f"({', '.join(M.PRIMITIVES)}) or a name from `masks`{names}",
            path,
        )
    if not isinstance(node, dict) or len(node) != 1:
        raise M.MaskError(f"a mask is a name or a mapping with exactly one key, got {node!r}", path)
    ((key, arg),) = node.items()
    prim = M.PRIMITIVES.get(key) if isinstance(key, str) else None
    if prim is None:
        known = sorted(set(M.PRIMITIVES) | set(named))
        raise M.MaskError(
            f"unknown mask '{key}'{suggest(key, known)}; expected one of {', '.join(M.PRIMITIVES)}", path + (key,)
        )
    if prim.bare:
        raise M.MaskError(f"'{key}' takes no argument; write it as a name: {key}", path + (key,))
    return prim.parse(arg, path + (key,), child)


def parse_layers(value: Any) -> Any:
    """Validate a layer selector (ValueError); returns it unchanged."""
    if value is None or isinstance(value, EveryLayers):
        return value
    if isinstance(value, int):
        if value < 0:
            raise ValueError("layer indices are >= 0")
        return value
    if isinstance(value, list):
        if any(x < 0 for x in value):
            raise ValueError("layer indices are >= 0")
        return value
    parse_index_set(value, "layer")
    return value


#: the most query heads an attention may have (head indices are below this)
MAX_HEADS = 4096


def parse_heads(key: str | int) -> list[int]:
    """Head indices of a ``heads`` key such as ``'0,3'`` or ``'4-7'`` (ValueError)."""
    ranges = parse_index_set(str(key), "head")
    out: set[int] = set()
    for lo, hi in ranges:
        if hi is None:
            raise ValueError(f"head range '{key}' must have an end, e.g. '4-7'")
        # checked before the range is expanded
        if hi >= MAX_HEADS:
            raise ValueError(f"head index {hi} in '{key}' is out of range: attention has at most {MAX_HEADS} heads")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _check_permute(spec: Spec, i: int) -> None:
    p = spec.rules[i].permute
    if p is None:
        return
    src, lines = spec._source, spec._lines
    base_path = ("rules", i, "permute")
    if p.grid is not None or p.tile is not None:
        if p.grid is None or p.tile is None:
            raise error_at("a static permutation needs both 'grid' and 'tile'", src, lines, base_path)
        try:
            g = need_triple(p.grid, (), "permute.grid", 1)
            t = need_triple(p.tile, (), "permute.tile", 1)
        except M.MaskError as e:
            raise error_at(e.message, src, lines, base_path) from None
        for axis, (gg, tt) in enumerate(zip(g, t)):
            if gg % tt:
                raise error_at(
                    f"permute.tile[{axis}] = {tt} does not divide grid[{axis}] = {gg}",
                    src,
                    lines,
                    base_path + ("tile", axis),
                )
        if p.by is not None:
            raise error_at("use either a static grid/tile permutation or 'by', not both", src, lines, base_path)
    elif p.text is not None:
        raise error_at("permute.text goes with a static {grid, tile} permutation", src, lines, base_path + ("text",))
    elif p.by is None:
        raise error_at("permute needs {grid, tile} or {by, segment}", src, lines, base_path)


#: bounds on a mask with its named masks expanded (kernels evaluate the whole tree per pair)
MAX_MASK_DEPTH = 64
MAX_MASK_NODES = 4096


def _tree(m: M.Mask, memo: dict[int, tuple[M.Mask, int, int]]) -> tuple[int, int]:
    """(depth, node count) of a mask tree, each shared subtree counted once per use but
    computed once (named masks reused many times cannot blow up the computation). The memo
    holds the masks themselves, so an id is never reused while it is there."""
    hit = memo.get(id(m))
    if hit is None:
        kids = [_tree(c, memo) for c in m.children()]
        hit = memo[id(m)] = (m, 1 + max((d for d, _ in kids), default=0), 1 + sum(n for _, n in kids))
    return hit[1], hit[2]


def compile_spec(spec: Spec) -> None:
    """Parse every named mask and rule mask of a validated spec into the IR (SpecError on the
    first problem); the results live on the spec (``spec.compiled(i)``)."""
    named: dict[str, M.Mask] = {}
    lines, src = spec._lines, spec._source

    sizes: dict[int, tuple[M.Mask, int, int]] = {}

    def mask(node: Any, path: Path) -> M.Mask:
        try:
            m = parse_mask(node, named, path)
        except M.MaskError as e:
            at = path + e.path if not e.path[: len(path)] == path else e.path
            raise error_at(e.message, src, lines, at) from None
        depth, size = _tree(m, sizes)
        if depth > MAX_MASK_DEPTH or size > MAX_MASK_NODES:
            raise error_at(
                f"this mask is {depth} levels deep with {size} nodes once named masks are expanded; "
                f"a mask may be at most {MAX_MASK_DEPTH} deep and {MAX_MASK_NODES} nodes",
                src,
                lines,
                path,
            )
        return m

    for name, node in spec.masks.items():
        if name in M.PRIMITIVES:
            raise error_at(
                f"mask name '{name}' shadows a primitive; choose another name", src, lines, ("masks", name, "__key__")
            )
        named[name] = mask(node, ("masks", name))
    compiled = []
    for i, rule in enumerate(spec.rules):
        try:
            parse_layers(rule.where.layers)
        except ValueError as e:
            raise error_at(str(e), src, lines, ("rules", i, "where", "layers")) from None
        base = mask(rule.mask, ("rules", i, "mask"))
        overrides = []
        for key, node in (rule.heads or {}).items():
            try:
                heads = parse_heads(key)
            except ValueError as e:
                raise error_at(str(e), src, lines, ("rules", i, "heads", key, "__key__")) from None
            overrides.append((key, heads, mask(node, ("rules", i, "heads", key))))
        _check_permute(spec, i)
        compiled.append(CompiledRule(base, overrides))
    spec._named = named
    spec._compiled = compiled
