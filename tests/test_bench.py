"""Smoke run of the benchmark entry point on tiny sizes (not timed: only that it runs and reports)."""

from __future__ import annotations

import json

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
        mod = B.flex_mask_mod(case, plan)
        order = plan.order()
        idx = torch.arange(seq)
        for h in (0, 3):
            got = mod(0, torch.tensor(h), idx.view(-1, 1), idx.view(1, -1))
            want = plan.dense_mask()[h]
            if order is not None:
                want = want[order][:, order]
            assert torch.equal(got, want), case.name


def test_machine_name_is_a_file_name():
    name = B.machine_name()
    assert name and all(c.isalnum() or c == "-" for c in name)
