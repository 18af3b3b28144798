"""Nothing from a spec runs as code; dump files are never written through links or into a
folder someone else made; the kernel cache lives in a private folder."""

from __future__ import annotations

import pathlib
import stat

import pytest
import torch
import torch.nn.functional as F

import attncc.codegen.cache as cache_mod
from attncc.codegen.cache import KernelCache, default_cache_dir
from attncc.codegen.files import UnsafePathError, copy_file, exclusive_folder, write_file
from attncc.config import config


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def hostile_names(marker: pathlib.Path) -> list[str]:
    """Rule names that would run code if pasted into a module's source (docstring, comment,
    string literal of either quote)."""
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"
    return [
        f'x"""\n{payload}\n"""',
        f"x'''\n{payload}\n'''",
        f"x\n{payload}\n#",
        f"x'\n{payload}\n'",
        f'x"; {payload}; "',
    ]


@pytest.mark.parametrize("which", range(5))
def test_rule_names_never_become_code(tmp_path, which, fresh_compiler):
    """A compile with the interpret executor (which imports the generated module), a dump and
    the ahead-of-time compiles (a subprocess that imports it again): the marker file the name
    would write is never written, and no generated .py file contains the name."""
    marker = tmp_path / "marker"
    name = hostile_names(marker)[which]
    spec = {"attncc": 1, "block_size": 16, "rules": [{"name": name, "mask": {"window": 8}}]}
    dump = tmp_path / "dump"
    # the ahead-of-time compile subprocess imports the module again: once is enough to cover it
    with config.scope(cache_dir=str(tmp_path / "cache"), dump_aot=which == 0):
        compiled = torch.compile(
            _Sdpa(), backend="attncc", options={"spec": spec, "executor": "interpret", "dump_dir": str(dump)}
        )
        q = torch.randn(1, 2, 32, 16)
        out = compiled(q, q, q)
    assert torch.isfinite(out).all()
    assert not marker.exists()
    sources = list((tmp_path / "cache").rglob("*.py")) + list(dump.rglob("*.py"))
    assert sources, "the compile generated no kernel source"
    for path in sources:
        assert "write_text('ran')" not in path.read_text(), f"{path} holds the rule name"


def test_exclusive_folder_never_reuses_an_existing_entry(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "graph_001_abcd").symlink_to(target)
    made = exclusive_folder(tmp_path / "dump", "graph_001_abcd")
    assert made.name == "graph_001_abcd_2" and not made.is_symlink()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert exclusive_folder(tmp_path / "dump", "graph_001_abcd").name == "graph_001_abcd_3"
    assert list(target.iterdir()) == []


def test_write_file_refuses_a_symbolic_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "manifest.json"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        write_file(link, "{}")
    with pytest.raises(UnsafePathError):
        copy_file(victim, link)
    assert victim.read_text() == "keep me"
    write_file(tmp_path / "plain.txt", "ok")
    assert (tmp_path / "plain.txt").read_text() == "ok"


def test_each_compiled_graph_gets_its_own_private_dump_folder(tmp_path, fresh_compiler):
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": "full"}]}
    for _ in range(2):
        torch._dynamo.reset()
        compiled = torch.compile(_Sdpa(), backend="attncc", options={"spec": spec, "dump_dir": str(tmp_path)})
        q = torch.randn(1, 2, 32, 16)
        compiled(q, q, q)
    folders = sorted(p for p in tmp_path.iterdir() if p.name.startswith("graph_"))
    assert len(folders) == 2
    for f in folders:
        assert stat.S_IMODE(f.stat().st_mode) == 0o700 and (f / "manifest.json").is_file()


def test_cache_falls_back_to_a_fresh_private_folder(tmp_path, monkeypatch):
    """Where ``~/.cache`` cannot be written, the cache is a new 0700 folder of this process (not
    a shared, predictable path)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o500)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(cache_mod, "_process_dir", None)
    private = cache_mod._private_dir
    # as for a user without write access to ~ (root ignores the mode bits, so say it directly)
    monkeypatch.setattr(cache_mod, "_private_dir", lambda p: None if str(p).startswith(str(home)) else private(p))
    with config.scope(cache_dir=None):
        path = default_cache_dir()
    assert not str(path).startswith(str(home))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert path.name.startswith("attncc-cache-") and path.name != "attncc-cache"
    assert KernelCache(path).root == path
