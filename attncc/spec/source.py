"""Reading a spec's YAML: safe loading only, with the position of every node and key recorded."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import yaml

from attncc.spec.errors import Path, Positions, SpecError, line_key

#: most YAML nodes a spec may hold (aliases count each time they are used)
MAX_NODES = 100_000


class _LineLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags) used for both composing and loading."""


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
            text = pathlib.Path(src).read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError(f"cannot read spec file: {e.strerror or e}", source) from None
        except UnicodeDecodeError as e:
            raise SpecError(f"the spec file is not UTF-8 text ({e.reason} at byte {e.start})", source) from None
    elif isinstance(src, str):
        source, text = "<string>", src
    else:
        raise SpecError(f"a spec is a path, YAML text, dict or attncc.Spec, got {type(src).__name__}")
    lines: Positions = {}
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
