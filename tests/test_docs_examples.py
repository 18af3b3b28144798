"""The examples the docs tell users to paste run as pasted and reach their own checks."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_block(doc: str, section: str) -> str:
    """The first ```python block under the heading ``section`` of ``docs/<doc>``."""
    text = (ROOT / "docs" / doc).read_text()
    start = text.index(f"## {section}\n")
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m is not None, f"no python block under '{section}' in docs/{doc}"
    return m.group(1)


def test_generate_example_in_usage(tmp_path):
    pytest.importorskip("transformers")
    script = tmp_path / "generate_example.py"
    script.write_text(python_block("usage.md", "Generate over a KV cache"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "same tokens: True" in run.stdout
    err = float(re.search(r"max \|logits - reference\|: (\S+)", run.stdout).group(1))
    assert err <= 1e-4
    assert "'unsupported': 0" in run.stdout and "'skipped': 0" in run.stdout


def test_apply_example_in_usage(tmp_path):
    pytest.importorskip("transformers")
    script = tmp_path / "apply_example.py"
    script.write_text(python_block("usage.md", "Without torch.compile: attncc.apply"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "same tokens: True" in run.stdout
    err = float(re.search(r"max \|logits - reference\|: (\S+)", run.stdout).group(1))
    assert err <= 1e-4


def test_apply_diffusers_example_in_usage(tmp_path):
    pytest.importorskip("diffusers")
    script = tmp_path / "apply_diffusers_example.py"
    script.write_text(python_block("usage.md", "attncc.apply on a diffusers model"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    err = float(re.search(r"max \|out - reference\|: (\S+)", run.stdout).group(1))
    assert err <= 1e-5
