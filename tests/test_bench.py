"""Smoke run of the benchmark entry point on tiny sizes (not timed: only that it runs and reports)."""

from __future__ import annotations

import json
import pathlib

import pytest

from bench import attention as B


def test_matrix_tiny_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = B.main(
        [
            "--seqs",
            "256",
            "--heads",
            "2",
            "--dim",
            "16",
            "--cases",
            "window256",
            "per_head",
            "causal",
            "--repeats",
            "1",
            "--no-flex",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "| window256 | 256 |" in table and "per_head" in table
    rows = json.loads(out.read_text())["matrix"]
    assert [r["case"] for r in rows] == ["causal", "window256", "per_head"]
    for r in rows:
        assert r["max_err_vs_reference"] < 1e-5
        assert 0 < r["density"] <= r["block_density"] <= 1
        assert {"attncc", "sdpa_dense", "sdpa_masked"} <= set(r["times_s"])


def test_flex_predicates_match_plan_masks():
    """The FlexAttention mask_mods encode exactly the plans' masks (else the comparison is unfair)."""
    import torch

    for case in B.cases(4):
        seq = case.grid[0] * case.grid[1] * case.grid[2] if case.grid else 600
        plan = B.make_plan(case, seq, 4, 4, 16, "float32", 64)
        ids = B.document_ids(seq, case.documents) if case.documents else None
        mod = B.flex_mask_mod(case, plan, ids=ids)
        order = plan.order()
        idx = torch.arange(seq)
        for h in (0, 3):
            got = mod(0, torch.tensor(h), idx.view(-1, 1), idx.view(1, -1))
            want = plan.dense_mask()[h]
            if ids is not None:
                # the documents written independently: a token sees its own document's keys
                want = want & (ids[0][:, None] == ids[0][None, :])
                assert int(ids.max()) == case.documents - 1 and ids.shape == (1, seq)
            if order is not None:
                want = want[order][:, order]
            assert torch.equal(got, want), case.name


def test_machine_name_is_a_file_name():
    name = B.machine_name()
    assert name and all(c.isalnum() or c == "-" for c in name)


def test_decode_benchmark_tiny_checks_and_writes_json(tmp_path, capsys, fresh_compiler):
    """Contexts 1536 and 3072 (past the 1024-token window): attncc and Flex both checked against
    fp64 SDPA with the explicit mask, one attncc graph for both contexts, no recompile while
    timing (the run fails otherwise)."""
    from bench import decode as D

    out = tmp_path / "d.json"
    assert D.main(["--contexts", "1536", "3072", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["context"] for r in result["rows"]] == [1536, 3072]
    for r in result["rows"]:
        assert r["kept_keys"] == 4 + 1024
        assert r["max_err_vs_fp64"] < 1e-4
        assert {"attncc", "attncc_new_step", "sdpa_dense", "flex"} <= set(r["times_s"])
    assert "| 3072 | 1028 |" in capsys.readouterr().out


def test_decode_benchmark_refuses_a_baseline_that_recompiles(monkeypatch, fresh_compiler):
    """A graph compiled while timing fails the run instead of printing a ratio."""
    import pytest

    from bench import decode as D

    calls = iter(range(1000))
    monkeypatch.setattr(D, "graphs", lambda: next(calls))
    with pytest.raises(D.BaselineError, match="recompiled"):
        D.main(["--contexts", "1536", "--repeats", "1", "--no-flex", "--no-json"])


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    """bench/gpu.sh --dry-run: the GPU run end to end on CPU (package layout without an install,
    preflight, the CUDA tests under the interpreter, both benchmarks writing their JSON)."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run(
        ["bash", str(root / "bench" / "gpu.sh"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in (tmp_path / "tests.txt").read_text()
    assert "device cpu (dry run)" in (tmp_path / "env.txt").read_text()
    decode = next(tmp_path.glob("decode-*.json"))
    assert json.loads(decode.read_text())["rows"][0]["context"] == 1536
    matrix = [p for p in tmp_path.glob("*.json") if not p.name.startswith("decode-")]
    assert [r["case"] for r in json.loads(matrix[0].read_text())["matrix"]] == ["causal", "window256"]


def test_host_bench_runs():
    from bench import host

    rounds = host.main(["--calls", "20", "--rounds", "2"])
    assert len(rounds) == 2 and all(r > 0 for r in rounds)
