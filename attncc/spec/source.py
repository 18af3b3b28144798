"""Reading a spec's YAML: safe loading only, with the position of every node and key recorded."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import yaml

from attncc.spec.errors import Path, Positions, SpecError, line_key

#: most YAML nodes a spec may hold (aliases count each time they are used)
MAX_NODES = 50_000
#: largest spec, in bytes of UTF-8 text (a spec is a page of YAML; this is hundreds of pages)
MAX_BYTES = 1 << 20
#: deepest nesting of YAML collections
MAX_DEPTH = 100
#: most digits of a plain integer (anything longer is far above every bound attncc checks)
MAX_DIGITS = 18

_SAFE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the same safe subset, faster


class _LineLoader(_SAFE):  # type: ignore[misc,valid-type]
    """SafeLoader (no Python tags) used for both composing and loading."""


_OPEN = (
    yaml.BlockMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.FlowSequenceStartToken,
)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
_INT = re.compile(r"[-+]?([0-9_]+|0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+)")


def _prescan(text: str, source: str) -> None:
    """Reject, at their line, what would crash or exhaust the loader later: nesting deeper than
    ``MAX_DEPTH`` and integers longer than ``MAX_DIGITS`` digits. One pass over the tokens (the
    scanner does not recurse)."""
    depth = 0
    for tok in yaml.scan(text, Loader=_LineLoader):
        where = (tok.start_mark.line + 1, tok.start_mark.column + 1)
        if isinstance(tok, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"the spec nests deeper than {MAX_DEPTH} levels", source, *where)
        elif isinstance(tok, _CLOSE):
            depth -= 1
        elif isinstance(tok, yaml.ScalarToken) and tok.plain and len(tok.value) > MAX_DIGITS:
            if _INT.fullmatch(tok.value):
                raise SpecError(
                    f"an integer of {len(tok.value)} characters; spec integers are below 2**31", source, *where
                )


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
    path: Path,
    out: Positions,
    source: str,
    active: frozenset[int] = frozenset(),
) -> None:
    """Record (line, column) of every node and key; reject duplicate keys, alias cycles and
    alias bombs."""
    where = (node.start_mark.line + 1, node.start_mark.column + 1)
    if id(node) in active:
        raise SpecError("a YAML alias refers to a node that contains it (a cycle)", source, *where, path)
    if len(out) > MAX_NODES:
        message = f"the spec expands to more than {MAX_NODES} YAML nodes (alias expansion?)"
        raise SpecError(message, source, *where, path)
    out.setdefault(line_key(path), where)
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
            out.setdefault(line_key(path + (key, "__key__")), (k.start_mark.line + 1, k.start_mark.column + 1))
            _positions(v, path + (key,), out, source, inner)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _positions(v, path + (i,), out, source, inner)


def is_path(src: Any) -> bool:
    """Whether a spec argument names a file (a ``pathlib.Path``, or a one-line string ending in
    ``.yaml``/``.yml`` or naming an existing file) rather than holding YAML text."""
    return isinstance(src, pathlib.Path) or (
        isinstance(src, str) and "\n" not in src and (src.endswith((".yaml", ".yml")) or os.path.exists(src))
    )


def read(src: Any) -> tuple[str, Any, Positions]:
    """(source name, plain data, positions) from a path, YAML text or dict."""
    if isinstance(src, dict):
        return "<dict>", src, {}
    if is_path(src):
        source = str(src)
        try:
            if pathlib.Path(src).stat().st_size > MAX_BYTES:
                raise SpecError(f"the spec file is larger than {MAX_BYTES} bytes (the limit on spec files)", source)
            text = pathlib.Path(src).read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError(f"cannot read spec file: {e.strerror or e}", source) from None
        except UnicodeDecodeError as e:
            raise SpecError(f"the spec file is not UTF-8 text ({e.reason} at byte {e.start})", source) from None
    elif isinstance(src, str):
        source, text = "<string>", src
    else:
        raise SpecError(f"a spec is a path, YAML text, dict or attncc.Spec, got {type(src).__name__}")
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise SpecError(f"the spec is larger than {MAX_BYTES} bytes (the limit on spec files)", source)
    lines: Positions = {}
    loader = _LineLoader(text)
    try:
        _prescan(text, source)
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, "YAML syntax error: {}", source) from None
    except yaml.YAMLError as e:
        raise SpecError(f"YAML error: {e}", source) from None
    if node is None:
        raise SpecError("the spec is empty; expected a mapping starting with 'attncc: 1'", source)
    _positions(node, (), lines, source)
    try:
        # the data from the node already composed (one parse of the text)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, "YAML error: {} (only plain YAML is allowed: no Python tags)", source) from None
    finally:
        loader.dispose()
    return source, data, lines
