"""Pattern importers: a DuoAttention pattern folder written in its documented format (what
``duo_attn.utils.load_attn_pattern`` reads) becomes a spec whose mask per layer and head is the
pattern, written here from DuoAttention's definition; bad files are refused at their line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attncc
from attncc.cli import main
from attncc.importers import PatternError, duo_spec

SINK, RECENT = 4, 16


def write_duo(folder, gates, sink=SINK, recent=RECENT):
    np.savetxt(folder / "full_attention_heads.tsv", np.array(gates), delimiter="\t")  # as DuoAttention saves it
    (folder / "config.json").write_text(json.dumps({"sink_size": sink, "recent_size": recent}))


def duo_pattern(gates, threshold, group, q_len):
    """[layers][query heads] -> bool [q, kv] mask, from DuoAttention's definition."""
    q = torch.arange(q_len)[:, None]
    k = torch.arange(q_len)[None, :]
    causal = k <= q
    streaming = causal & ((k < SINK) | (q - k < RECENT))
    return [[causal if row[h // group] >= threshold else streaming for h in range(len(row) * group)] for row in gates]


@pytest.mark.parametrize("group", [1, 2])
def test_duo_two_layers_round_trip(tmp_path, group):
    gates = [[0.9, 0.1, 0.5], [0.2, 0.3, 0.0]]
    write_duo(tmp_path, gates)
    spec = duo_spec(tmp_path, group=group, block=16)
    want = duo_pattern(gates, 0.5, group, 96)
    for layer in range(2):
        got = attncc.dense_mask(spec, 96, num_heads=3 * group, layer=layer)
        for h in range(3 * group):
            assert torch.equal(got[h], want[layer][h]), (layer, h)
    assert "layer 0 gates: 0.9 0.1 0.5" in spec  # where each rule came from


def test_duo_sparsity_quantile_and_identical_layers(tmp_path):
    gates = [[0.1, 0.8], [0.7, 0.05], [0.1, 0.8]]
    write_duo(tmp_path, gates)
    spec = duo_spec(tmp_path, sparsity=0.5)
    threshold = float(np.quantile(np.array(gates), 0.5))
    want = duo_pattern(gates, threshold, 1, 64)
    for layer in range(3):
        got = attncc.dense_mask(spec, 64, num_heads=2, layer=layer)
        assert all(torch.equal(got[h], want[layer][h]) for h in range(2))
    assert spec.count("- where:") == 2  # layers 0 and 2 share one rule
    assert '{layers: "0,2"}' in spec


def test_duo_all_retrieval_layer_is_causal(tmp_path):
    write_duo(tmp_path, [[1.0, 1.0], [0.0, 0.0]])
    spec = attncc.load_spec(duo_spec(tmp_path))
    assert attncc.dense_mask(spec, 40, num_heads=2, layer=0).equal(torch.ones(2, 40, 40, dtype=torch.bool).tril())


def test_cli_import_duo(tmp_path, capsys):
    write_duo(tmp_path, [[0.9, 0.1]])
    out = tmp_path / "duo.yaml"
    assert main(["import", "duo", str(tmp_path), "--group", "4", "-o", str(out)]) == 0
    spec = attncc.load_spec(out)
    got = attncc.dense_mask(spec, 48, num_heads=8, layer=0)
    want = duo_pattern([[0.9, 0.1]], 0.5, 4, 48)[0]
    assert all(torch.equal(got[h], want[h]) for h in range(8))
    assert main(["import", "duo", str(tmp_path)]) == 0
    assert "attncc: 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "tsv,config,match",
    [
        ("0.5\tx\n", {"sink_size": 4, "recent_size": 8}, r"full_attention_heads.tsv:1: expected tab-separated numbers"),
        ("0.5\t0.1\n0.2\n", {"sink_size": 4, "recent_size": 8}, "one gate per kv head"),
        ("0.5\tnan\n", {"sink_size": 4, "recent_size": 8}, "not finite"),
        ("0.5\n", {"sink_size": 4}, "sink_size and recent_size"),
        ("0.5\n", {"sink_size": -1, "recent_size": 8}, "sink_size must be a non-negative integer"),
        ("0.5\n", {"sink_size": 4, "recent_size": 0}, "recent_size must be at least 1"),
        ("", {"sink_size": 4, "recent_size": 8}, "no rows"),
    ],
)
def test_duo_bad_files_are_refused_where_they_are_wrong(tmp_path, tsv, config, match):
    (tmp_path / "full_attention_heads.tsv").write_text(tsv)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PatternError, match=match):
        duo_spec(tmp_path)


def test_duo_missing_folder_and_cli_error(tmp_path, capsys):
    with pytest.raises(PatternError, match="config.json: not found|full_attention_heads.tsv: not found"):
        duo_spec(tmp_path)
    assert main(["import", "duo", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
