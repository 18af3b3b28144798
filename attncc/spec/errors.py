"""SpecError: every problem with a spec, located by file, line, column and key path."""

from __future__ import annotations

Path = tuple[str | int, ...]
#: (line, column) of every YAML node and key, by key path (see :func:`line_key`)
Positions = dict[tuple[str, ...], tuple[int, int]]


class SpecError(ValueError):
    """A spec is invalid. The message names the file, line/column, key path and what was expected."""

    def __init__(
        self, message: str, source: str = "<spec>", line: int | None = None, column: int | None = None, path: Path = ()
    ):
        self.message, self.source, self.line, self.column, self.path = message, source, line, column, path
        where = source
        if line is not None:
            where += f":{line}" + (f":{column}" if column is not None else "")
        key = "/".join(str(p) for p in path)
        super().__init__(f"{where}: {('at ' + key + ': ') if key else ''}{message}")


def line_key(path: Path) -> tuple[str, ...]:
    """Key of the position table: mapping keys and list indices as strings (YAML keys such
    as ``0:`` load as ints but compose as strings)."""
    return tuple(str(x) for x in path)


def error_at(message: str, source: str, lines: Positions, path: Path) -> SpecError:
    """A SpecError at ``path``; the nearest recorded ancestor gives the line. A trailing
    ``"__key__"`` in ``path`` points at the key itself rather than its value."""
    p = line_key(path)
    while p and p not in lines:
        p = p[:-1]
    line, col = lines.get(p, (None, None))
    clean = tuple(x for x in path if x != "__key__")
    return SpecError(message, source, line, col, clean)
