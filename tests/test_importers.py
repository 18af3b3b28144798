"""Pattern importers: files written in each project's format (a DuoAttention pattern folder, as
``duo_attn.utils.load_attn_pattern`` reads it; XAttention's per-layer, per-head thresholds as its
``profile_threshold.py`` and ``llama_threshold.py`` hold them; a MInference best-pattern JSON as
``minference_forward.py`` reads it) become specs whose mask per layer and head is the pattern,
written here from each project's definition (for data-dependent heads: the selector parameters
the project uses); bad files are refused at their line or key."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import attncc
from attncc.cli import main
from attncc.codegen.executors import run
from attncc.importers import PatternError, duo_spec, minference_spec, xattention_spec
from attncc.ir import masks as M
from attncc.ir.selection import resolve_selector, selectors_of, split_program
from attncc.spec import SiteShape, load_spec, plan_for

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


# -- XAttention --------------------------------------------------------------------------------------
def head_programs(spec, layer, heads, q_len):
    plan = plan_for(load_spec(spec), SiteShape(num_heads=heads, q_len=q_len, layer=layer))
    return [plan.programs[plan.head_to_program[h]] for h in range(heads)], plan


def xattention_static(q_len, block):
    """XAttention's always-kept blocks of a causal prefill: kv block 0 and the diagonal block."""
    q = torch.arange(q_len)[:, None]
    k = torch.arange(q_len)[None, :]
    return (k <= q) & ((k < block) | (q // block == k // block))


def selector_of(program):
    sels = selectors_of(program)
    return resolve_selector(sels[0], 128, 128) if sels else None


XATTN = [[0.9, 0.9, 0.0, 0.93], 0.95, [0.9, 0.9, 0.0, 0.93]]  # per-head rows and one whole-layer value


def check_xattention(spec, rows, stride, q_len=300):
    static = xattention_static(q_len, 128)
    for layer, row in enumerate(rows):
        row = row if isinstance(row, list) else [row] * 4
        programs, plan = head_programs(spec, layer, 4, q_len)
        for h, tau in enumerate(row):
            cfg = selector_of(programs[h])
            # the always-kept blocks are the static part, whatever the selection
            kept = split_program(programs[h]).when_not
            assert torch.equal(M.dense(kept, q_len, q_len)[0], static), (layer, h)
            if tau == 0:
                assert cfg is None
                assert torch.equal(M.dense(programs[h], q_len, q_len)[0], static)
            else:
                assert (cfg.method, cfg.score, cfg.tau, cfg.pool, cfg.block) == (
                    "threshold",
                    "antidiagonal",
                    tau,
                    stride,
                    128,
                )
                assert split_program(programs[h]).when_selected == M.Causal()


def test_xattention_json_round_trip(tmp_path):
    f = tmp_path / "thresholds.json"
    f.write_text(json.dumps(XATTN))
    spec = xattention_spec(f, stride=8)
    check_xattention(spec, XATTN, 8)
    assert spec.count("- where:") == 2 and '{layers: "0,2"}' in spec  # layers 0 and 2 share one rule
    assert "layer 0 thresholds: 0.9 0.9 0 0.93" in spec and "every head tau 0.95" in spec


def test_xattention_python_tables_pick_by_stride_and_name(tmp_path):
    rows8, rows16 = [[0.5, 0.5, 0.6, 0.6], [0.0] * 4], [[0.7] * 4, [0.8, 0.8, 0.9, 0.9]]
    f = tmp_path / "llama_threshold.py"  # as xattn/threshold/llama_threshold.py holds them
    f.write_text(f"llama_fuse_8 = {rows8}\nllama_fuse_16 = {rows16}\n")
    check_xattention(xattention_spec(f, stride=8), rows8, 8)
    static = attncc.dense_mask(xattention_spec(f, stride=8), 300, num_heads=4, layer=1)  # tau 0: a static layer
    assert all(torch.equal(static[h], xattention_static(300, 128)) for h in range(4))
    check_xattention(xattention_spec(f), rows16, 16)
    check_xattention(xattention_spec(f, stride=4, table="llama_fuse_8"), rows8, 4)
    with pytest.raises(
        PatternError, match="--stride 4: no llama_fuse_4; pick one with --table: llama_fuse_8, llama_fuse_16"
    ):
        xattention_spec(f, stride=4)


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("t.json", "[[0.5, 0.5],\n [0.5 0.5]]", r"t.json:2:7: not JSON"),
        ("t.json", "[[0.5, 1.5]]", r"layer 0, head 1: threshold 1.5 is outside \[0, 1\]"),
        ("t.json", '[0.5, "x"]', r"layer 1: 'x' is not a number; expected a list with one entry per layer"),
        ("t.json", "[0.5, []]", "layer 1: an empty list"),
        ("t.json", '{"0": 0.5}', "expected a list with one entry per layer"),
        ("t.py", "x = [0.5]\ny = open('f')\n", r"t.py:2: y is not a literal"),
        ("t.py", "x = [0.5\n", r"t.py:1: not Python"),
        ("t.py", "import os\n", "no assignments NAME"),
    ],
    ids=[
        "json_syntax",
        "tau_above_one",
        "not_a_number",
        "empty_layer",
        "not_a_list",
        "py_call",
        "py_syntax",
        "py_empty",
    ],
)
def test_xattention_bad_files_are_refused_where_they_are_wrong(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(PatternError, match=match):
        xattention_spec(tmp_path / name)


def test_xattention_stride_must_divide_the_block(tmp_path):
    (tmp_path / "t.json").write_text("[0.5]")
    with pytest.raises(PatternError, match="--stride 48: must divide the block size 128"):
        xattention_spec(tmp_path / "t.json", stride=48)


def test_cli_import_xattention(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(XATTN))
    out = tmp_path / "x.yaml"
    assert main(["import", "xattention", str(tmp_path / "t.json"), "--stride", "8", "-o", str(out)]) == 0
    check_xattention(out.read_text(), XATTN, 8)
    assert main(["import", "xattention", str(tmp_path / "missing.json")]) == 2
    assert "attncc import xattention:" in capsys.readouterr().err


# -- MInference --------------------------------------------------------------------------------------
MINF = [
    {
        "0": ["vertical_and_slash", 1000, 6096, 0.9],
        "1": ["stream_llm", 4, 24, 0.5],
        "2": ["block_sparse", 7, 9, 0.1],
        "3": ["vertical_and_slash", 10, 20, 3],
    },
    {"0": ["a_shape", 0, 16, 1.0], "2": ["stream_llm", 4, 24, 0.5], "3": ["vertical_and_slash", 3500, 100, 2]},
    {
        "0": ["vertical_and_slash", 1000, 6096, 0.9],
        "1": ["stream_llm", 4, 24, 0.5],
        "2": ["block_sparse", 7, 9, 0.1],
        "3": ["vertical_and_slash", 10, 20, 3],
    },
]


def minference_expected(entry, q_len):
    """What MInference runs for a head (its forward's table; missing heads: vertical_and_slash
    1000 / 6096): a bool [q, kv] mask for streaming heads, selector parameters otherwise."""
    ty, v, s = (entry or ["vertical_and_slash", 1000, 6096, 0])[:3]
    if ty in ("stream_llm", "a_shape"):  # streaming_forward(n_init=v, n_local=s)
        q = torch.arange(q_len)[:, None]
        k = torch.arange(q_len)[None, :]
        return (k <= q) & ((k < v) | (q - k < s))
    if ty == "block_sparse":  # block_sparse_attention(top_k=100), 64-token blocks
        return ("topk", "mean_pool", 100, 64)
    # min(q_len, max(v, 30)), min(q_len, max(s, 50)); last_q 64; first 30 columns, last 100 diagonals
    return ("vertical_slash", max(v, 30), max(s, 50), 64, 30, 100, 64)


def check_minference(spec, layers, heads=6, q_len=200):
    for layer, entry in enumerate(layers):
        programs, plan = head_programs(spec, layer, heads, q_len)
        for h in range(heads):
            want = minference_expected(entry.get(str(h)), q_len)
            prog = programs[h]
            if isinstance(want, torch.Tensor):
                assert not prog.is_dynamic
                assert torch.equal(M.dense(prog, q_len, q_len)[0], want), (layer, h)
                continue
            sels = selectors_of(prog)
            assert len(sels) == 1 and split_program(prog).when_selected == M.Causal(), (layer, h)
            assert split_program(prog).when_not == M.EMPTY
            cfg = resolve_selector(sels[0], plan.block_q, plan.block_kv)
            if cfg.method == "topk":
                got = (cfg.method, cfg.score, cfg.k, cfg.block)
            else:
                got = (cfg.method, cfg.vertical, cfg.slash, cfg.last_q, cfg.keep_first, cfg.keep_recent, cfg.block)
            assert got == want, (layer, h)


def test_minference_round_trip_mixed_patterns(tmp_path):
    f = tmp_path / "best_pattern.json"
    f.write_text(json.dumps(MINF))
    spec = minference_spec(f)
    check_minference(spec, MINF)  # heads 4-5 and layer 1's head 1 are not in the file: the default
    assert spec.count("- where:") == 2 and '{layers: "0,2"}' in spec
    assert "heads 1 are not in the file" in spec and "clamped as MInference does" in spec


def test_minference_streaming_heads_run_as_their_pattern(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"0": ["stream_llm", 8, 32, 0], "1": ["a_shape", 8, 32, 0]}]))
    spec = minference_spec(f)
    got = attncc.dense_mask(spec, 130, num_heads=2, layer=0)
    want = minference_expected(["stream_llm", 8, 32], 130)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


@pytest.mark.parametrize(
    "text,match",
    [
        (
            '[{"0": ["vertical_and_slash", 1000, 6096, 1]},\n {"0": ["dense", 1, 1, 0]}]',
            r"layer 1, head \"0\": unknown pattern type 'dense'; expected one of stream_llm",
        ),
        ('[{"x": ["stream_llm", 1, 8, 0]}]', r"layer 0, head \"x\": a head index is a non-negative integer"),
        ('[{"0": ["stream_llm", 1, 8]}]', r"expected \[type, vertical_size, slash_size, score\]"),
        ('[{"0": ["stream_llm", -1, 8, 0]}]', "vertical_size must be a non-negative integer"),
        ('[{"0": ["stream_llm", 4, 0, 0]}]', r"slash_size \(the local window, n_local\) must be at least 1"),
        ('[{"0": ["block_sparse", 1.5, 8, 0]}]', "vertical_size must be a non-negative integer, got 1.5"),
        ('[["stream_llm", 1, 8, 0]]', "layer 0: a list; expected a list with one object per layer"),
        ("[]", "expected a list with one object per layer"),
        ('[{"0": [\n"stream_llm", 1, 8, 0}]', r"p.json:2:22: not JSON"),
    ],
    ids=[
        "unknown_type",
        "head_key",
        "three_entries",
        "negative",
        "no_window",
        "float_size",
        "layer_not_object",
        "empty",
        "syntax",
    ],
)
def test_minference_bad_files_are_refused_where_they_are_wrong(tmp_path, text, match):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(PatternError, match=match):
        minference_spec(tmp_path / "p.json")


def test_cli_import_minference(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps(MINF))
    out = tmp_path / "m.yaml"
    assert main(["import", "minference", str(tmp_path / "p.json"), "-o", str(out)]) == 0
    check_minference(out.read_text(), MINF)
    assert main(["import", "minference", str(tmp_path / "p.json")]) == 0
    assert "vertical_slash" in capsys.readouterr().out
    assert main(["import", "minference", str(tmp_path / "p.json"), "--block", "128"]) == 2
    assert "--block 128: a power of two from 16 to 64" in capsys.readouterr().err
    assert main(["import", "minference", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: not found" in capsys.readouterr().err


@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_imported_minference_layer_runs_every_head_kind(tmp_path, executor):
    (tmp_path / "p.json").write_text(json.dumps(MINF))
    programs, plan = head_programs(minference_spec(tmp_path / "p.json"), 0, 6, 200)
    plan = dataclasses.replace(plan, head_dim=32, head_dim_v=32, scale=32**-0.5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 200, 32, generator=g) for _ in range(3))
    out, _ = run(plan, q, k, v, None, executor)
    want, _ = run(plan, q, k, v, None, "reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
