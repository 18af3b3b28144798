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


def run_example(tmp_path, section: str) -> str:
    """Run the first python block under ``section`` of docs/usage.md as pasted; its stdout."""
    script = tmp_path / "example.py"
    script.write_text(python_block("usage.md", section))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def printed(out: str, label: str) -> float:
    """The number an example prints after ``label``."""
    return float(re.search(re.escape(label) + r": (\S+)", out).group(1))


def test_generate_example_in_usage(tmp_path):
    pytest.importorskip("transformers")
    out = run_example(tmp_path, "Generate over a KV cache")
    assert "same tokens: True" in out
    assert printed(out, "max |logits - reference|") <= 1e-4
    assert "'unsupported': 0" in out and "'skipped': 0" in out


def test_apply_example_in_usage(tmp_path):
    pytest.importorskip("transformers")
    out = run_example(tmp_path, "Without torch.compile: attncc.apply")
    assert "same tokens: True" in out
    assert printed(out, "max |logits - reference|") <= 1e-4


def test_apply_diffusers_example_in_usage(tmp_path):
    pytest.importorskip("diffusers")
    out = run_example(tmp_path, "attncc.apply on a diffusers model")
    assert printed(out, "max |out - reference|") <= 1e-5


def test_packed_documents_example_in_usage(tmp_path):
    pytest.importorskip("transformers")
    out = run_example(tmp_path, "Packed sequences (documents)")
    assert printed(out, "max |logits - reference|") <= 1e-4
    # a 16-token window inside documents of 20, 33, 27 tokens (causal pairs within the window)
    want = sum(sum(min(i + 1, 16) for i in range(n)) for n in (20, 33, 27)) / 80**2
    densities = re.search(r"density: \[(.*?)\]", out).group(1).split(", ")
    assert [float(d) for d in densities] == pytest.approx([want] * 2, abs=1e-4)
