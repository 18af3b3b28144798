"""The layering stays true: imports point down (docs/layout.md), no cycle, no lazy attncc import
below the top layer. CI also runs ``.ci/check_layers.py`` directly."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / ".ci" / "check_layers.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_tree_is_layered():
    assert _checker().violations() == []


def test_the_check_finds_cycles_lazy_imports_and_upward_imports(tmp_path, monkeypatch):
    files = {
        "attncc/__init__.py": "",
        "attncc/ir/__init__.py": "",
        "attncc/ir/a.py": "def f():\n    from attncc.ir import b\n",
        "attncc/ir/b.py": "from attncc.ir.a import f\n",
        "attncc/backend.py": "def g():\n    import attncc.ir.a\n",
        "passes/__init__.py": "",
        "passes/p.py": "",
        "codegen/__init__.py": "",
        "codegen/x.py": "from attncc.passes import p\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    check = _checker()
    monkeypatch.setattr(check, "ROOT", tmp_path)
    found = check.violations()
    assert any("attncc.ir.a imports attncc.ir.b inside a function (layer ir)" in p for p in found), found
    assert any("attncc.codegen.x (layer codegen) imports attncc.passes.p (layer passes, above)" in p for p in found)
    assert any(p.startswith("import cycle:") and "attncc.ir.a" in p and "attncc.ir.b" in p for p in found)
    # the top layer may import lazily
    assert not any("attncc.backend" in p for p in found), found
