"""The attncc command: validate, explain (table and PNG), schema (committed copy is current), dump slot."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import attncc
from attncc.cli import main
from attncc.spec import json_schema, load_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
BAD = pathlib.Path(__file__).parent / "specs" / "bad"

# spec -> (q_len, heads, layers, {layer: rule})
EXPLAIN = {
    "streaming": (256, 2, 1, {0: "sink-and-window"}),
    "longformer": (1024, 2, 1, {0: "window-and-global"}),
    "bigbird": (512, 2, 1, {0: "global-window-random"}),
    "duo": (256, 8, 1, {0: "retrieval-and-streaming-heads"}),
    "masformer": (
        256,
        2,
        9,
        {
            0: "full-layers-bottom",
            1: "full-layers-bottom",
            6: "local-layers",
            7: "full-layers-periodic",
            8: "local-layers",
        },
    ),
    "longgen": (256, 2, 17, {7: "sink-window", 8: "middle-full", 15: "middle-full", 16: "sink-window"}),
    "power": (256, 2, 1, {0: "power-of-two"}),
    "block_diffusion": (64, 2, 1, {0: "block-causal"}),
    "video_tile": (1024, 1, 1, {0: "neighbourhood-3d"}),
    "sinklora": (4096, 8, 1, {0: "rules[0]"}),
    "cogvideox": (976, 2, 1, {0: "text-video"}),
    "hunyuan_video": (1056, 2, 1, {0: "video-text"}),
    "flux_text_image": (1536, 2, 1, {0: "text-image"}),
    "radial_video": (2048, 1, 1, {0: "radial"}),
    "uni_encoder": (456, 1, 1, {0: "rules[0]"}),
    "anchor_attention": (4096, 1, 1, {0: "rules[0]"}),
}


def _rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start:] if line.strip()]


def _heads(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def test_every_ready_spec_is_explained():
    assert {p.stem for p in SPECS.glob("*.yaml")} == set(EXPLAIN)


@pytest.mark.parametrize("name", sorted(EXPLAIN))
def test_explain_ready_spec(name, capsys):
    """Every row's rule is the expected one, its density equals the dense reference and its
    block counts add up to the block grid."""
    q_len, heads, layers, rules = EXPLAIN[name]
    spec = SPECS / f"{name}.yaml"
    rc = main(["explain", str(spec), "--q-len", str(q_len), "--heads", str(heads), "--layers", str(layers)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(out)
    seen_heads: dict[int, list[int]] = {}
    block = load_spec(spec).block_sizes(0)[0]
    for layer, rule, head_list, density, empty, partial, full, _visited, _mask in rows:
        layer_i, hs = int(layer), _heads(head_list)
        seen_heads.setdefault(layer_i, []).extend(hs)
        if layer_i in rules:
            assert rule == rules[layer_i]
        reference = attncc.dense_mask(spec, q_len, num_heads=heads, layer=layer_i)[hs].double().mean(dim=(1, 2))
        assert torch.allclose(reference, torch.tensor(float(density), dtype=torch.float64), atol=5e-5), (layer, hs)
        assert int(empty) + int(partial) + int(full) == (-(-q_len // block)) ** 2
    assert {k: sorted(v) for k, v in seen_heads.items()} == {x: list(range(heads)) for x in range(layers)}


def test_explain_draws_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "map.png"
    rc = main(
        [
            "explain",
            str(SPECS / "duo.yaml"),
            "--q-len",
            "200",
            "--kv-len",
            "300",
            "--q-offset",
            "100",
            "--heads",
            "8",
            "--layers",
            "2",
            "--png",
            str(png),
        ]
    )
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "q_len 200, kv_len 300, q_offset 100" in capsys.readouterr().out


def test_explain_unmatched_layers_and_module(capsys):
    spec = "{attncc: 1, rules: [{where: {module: '*.self_attn', layers: 0}, mask: causal}]}"
    assert main(["explain", spec, "--q-len", "64", "--heads", "1", "--layers", "2", "--module", "m.self_attn"]) == 0
    out = capsys.readouterr().out
    assert "no rule matches" in out and "rules[0]" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["explain", str(BAD / "head_out_of_range.yaml"), "--q-len", "64", "--heads", "8", "--layers", "1"],
            "head_out_of_range.yaml:5:7: at rules/0/heads/0,9: head 9 is out of range",
        ),
        (
            ["explain", str(SPECS / "video_tile.yaml"), "--q-len", "100", "--heads", "1", "--layers", "1"],
            "video_tile.yaml:12:14: at rules/0/permute: permute grid [2, 16, 32] holds 1024 tokens but the query",
        ),
        (
            [
                "explain",
                "{attncc: 1, rules: [{name: sel, mask: {topk: {k: 2}}}]}",
                "--q-len",
                "64",
                "--heads",
                "1",
                "--layers",
                "1",
            ],
            # refused at bind time, or (where selectors execute) reported as having no static block map
            "'topk'",
        ),
        (["explain", str(SPECS / "duo.yaml"), "--q-len", "0", "--heads", "1", "--layers", "1"], "--q-len must be >= 1"),
    ],
    ids=["head_out_of_range", "permute_length", "selector", "bad_length"],
)
def test_explain_errors(argv, message, capsys):
    assert main(argv) != 0
    assert message in capsys.readouterr().err


def test_validate_exit_codes(capsys):
    assert main(["validate", *map(str, sorted(SPECS.glob("*.yaml")))]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(EXPLAIN)
    assert main(["validate", str(SPECS / "streaming.yaml"), str(BAD / "misspelled_primitive.yaml")]) == 1
    captured = capsys.readouterr()
    assert "streaming.yaml: ok" in captured.out
    assert "misspelled_primitive.yaml:4:" in captured.err and "did you mean 'window'" in captured.err


def test_committed_schema_is_current(capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json_schema()
    committed = json.loads((SPECS / "schema.json").read_text())
    assert committed == printed, "specs/schema.json is stale: run `attncc schema > specs/schema.json`"
    mask = printed["$defs"]["Mask"]
    assert {next(iter(o["properties"])) for o in mask["anyOf"] if o.get("type") == "object"} >= {
        "window",
        "sink",
        "all",
        "any",
        "not",
        "tile3d",
        "power",
        "topk",
    }


def test_dump_subcommand_delegates_to_codegen_dump(tmp_path, capsys):
    out = tmp_path / "dump"
    args = ["dump", str(SPECS / "streaming.yaml"), "--q-len", "128", "--heads", "2", "--head-dim", "32"]
    assert main([*args, "--out", str(out), "--no-aot"]) == 0
    assert "_fwd_kernel" in capsys.readouterr().out
    assert (out / "manifest.json").exists() and list(out.glob("*_fwd_kernel_*.py"))


def test_console_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "attncc.cli", "validate", str(SPECS / "power.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "power.yaml: ok" in done.stdout


def test_every_hostile_spec_is_a_one_line_error_in_validate_and_explain(capsys):
    """validate and explain print the SpecError (file:line) for every file of the hostile
    corpus and exit 1: no traceback, whatever the input."""
    bad = [p for p in sorted(BAD.glob("*.yaml")) if p.name != "head_out_of_range.yaml"]
    assert main(["validate", *map(str, bad)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    for path in bad:
        assert main(["explain", str(path), "--q-len", "64", "--heads", "4", "--layers", "2"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(path) in err, err
