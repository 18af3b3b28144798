"""Check that attncc's imports point down its layers: no import cycle (imports inside functions
count), no attncc import inside a function below the top layer, no import of a higher layer.

    python .ci/check_layers.py        # exit 1 and one line per violation

The layers, top to bottom (docs/layout.md); a module may import its own layer and the ones below:

| layer | modules |
| --- | --- |
| top | ``attncc`` (the package), ``attncc.backend``, ``attncc.cli``, ``attncc.explain``, ``attncc.counters`` |
| passes | ``attncc.passes.*`` |
| runtime | ``attncc.runtime.*`` |
| codegen | ``attncc.codegen.*`` |
| spec | ``attncc.spec.*`` |
| ir | ``attncc.ir.*`` |
| base | ``attncc.config``, ``attncc.version`` (leaves every layer reads) |
"""

from __future__ import annotations

import ast
import pathlib
import sys
from dataclasses import dataclass

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (pyproject's package-dir mapping)
SOURCES = {"attncc": "attncc", "passes": "attncc.passes", "codegen": "attncc.codegen"}
LAYERS = ("top", "passes", "runtime", "codegen", "spec", "ir", "base")
_BASE = {"attncc.config", "attncc.version"}


def layer_of(module: str) -> str:
    if module in _BASE:
        return "base"
    for name in ("passes", "runtime", "codegen", "spec", "ir"):
        prefix = f"attncc.{name}"
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "top"


def modules() -> dict[str, pathlib.Path]:
    """Every attncc module by dotted name."""
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    in_function: bool


def _is_package(name: str, known: dict[str, pathlib.Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def imports(name: str, path: pathlib.Path, known: dict[str, pathlib.Path]) -> list[Import]:
    """The attncc modules ``name`` imports (``from a import b`` names module ``a.b`` when it is
    one, else ``a``), each with its line and whether it sits inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(name, known) else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            for t in targets:
                if t == "attncc" or t.startswith("attncc."):
                    while t not in known and "." in t:
                        t = t.rpartition(".")[0]
                    found.append(Import(name, t, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def violations() -> list[str]:
    known = modules()
    graph = nx.DiGraph()
    problems = []
    for name, path in known.items():
        graph.add_node(name)
        for imp in imports(name, path, known):
            rel = path.relative_to(ROOT)
            if imp.target == name:
                continue
            graph.add_edge(name, imp.target, line=imp.line)
            here, there = layer_of(name), layer_of(imp.target)
            if imp.in_function and here != "top":
                problems.append(f"{rel}:{imp.line}: {name} imports {imp.target} inside a function (layer {here})")
            if LAYERS.index(there) < LAYERS.index(here):
                problems.append(f"{rel}:{imp.line}: {name} (layer {here}) imports {imp.target} (layer {there}, above)")
    for cycle in nx.simple_cycles(graph):
        problems.append("import cycle: " + " -> ".join([*cycle, cycle[0]]))
    return problems


def main() -> int:
    problems = violations()
    for p in problems:
        print(p)
    print(f"{len(modules())} modules, {len(problems)} layering violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
