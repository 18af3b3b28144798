"""``load_spec``: a path, YAML text, dict or Spec -> a validated, compiled Spec, or a located SpecError."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from attncc.ir.masks.args import suggest
from attncc.spec.errors import Positions, SpecError, error_at
from attncc.spec.models import BlockSize, EveryLayers, Permute, Reuse, Rule, Spec, Where
from attncc.spec.parse import compile_spec
from attncc.spec.source import read


def load_spec(src: Any) -> Spec:
    """Load a spec from a path, ``pathlib.Path``, YAML text, dict or ``Spec``.

    Every problem raises :class:`SpecError` naming the file, line, column and key path;
    no other exception escapes.
    """
    if isinstance(src, Spec):
        return src
    source = "<spec>"
    try:
        source, data, lines = read(src)
        return _load(data, source, lines)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError("the spec is nested too deeply", source) from None
    except Exception as e:  # a safety net: report, never crash, on inputs the checks above missed
        raise SpecError(f"could not read the spec ({type(e).__name__}: {e})", source) from e


def _load(data: Any, source: str, lines: Positions) -> Spec:
    if not isinstance(data, dict):
        raise error_at(
            f"a spec is a mapping with 'attncc: 1', 'rules', ...; got a {type(data).__name__}", source, lines, ()
        )
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise error_at(f"top-level keys are names, got {bad_keys[0]!r}", source, lines, (bad_keys[0], "__key__"))
    if "attncc" not in data:
        raise error_at("missing the format version 'attncc: 1' at the top", source, lines, ())
    version = data["attncc"]
    if type(version) is not int or version != 1:
        raise error_at(
            f"unsupported spec version {version!r}; this attncc reads 'attncc: 1'", source, lines, ("attncc",)
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e, data, source, lines) from None
    spec._source, spec._lines = source, lines
    compile_spec(spec)
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


def _from_validation(err: ValidationError, data: Any, source: str, lines: Positions) -> SpecError:
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
        hint = suggest(key, allowed)
        expected = f"; expected one of: {', '.join(sorted(allowed))}" if allowed else ""
        return error_at(f"unknown key '{key}'{hint}{expected}", source, lines, tuple(parent) + (key, "__key__"))
    if e["type"] == "missing":
        return error_at(f"missing required key '{e['loc'][-1]}'", source, lines, tuple(path))
    got = e.get("input")
    got_text = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    msg = e["msg"].removeprefix("Value error, ")
    return error_at(f"{msg} (got {got_text})", source, lines, tuple(path))


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
