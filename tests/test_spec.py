"""Spec format v1: ready specs load and resolve; every bad spec is a located SpecError and nothing else escapes."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc.ir import masks as M
from attncc.spec import SpecError, check_executable, json_schema, load_spec, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]
BAD = pathlib.Path(__file__).parent / "specs" / "bad"
READY = sorted((ROOT / "specs").glob("*.yaml"))


#: every file ends with ``# expect: <line or -> | <key path or *> | <regex of the message>``
#: (or ``# expect: valid``: a spec that loads and fails later, tested by name below)
def bad_specs() -> dict[str, tuple[int | None, str, str]]:
    out = {}
    for path in sorted(BAD.glob("*.yaml")):
        last = path.read_text().rstrip("\n").rsplit("\n", 1)[-1]
        m = re.fullmatch(r"# expect: (\d+|-) \| (\S*) \| (.+)", last)
        if last.startswith("# expect: valid"):
            continue
        assert m, f"{path.name} has no '# expect: line | path | regex' last line"
        out[path.name] = (None if m.group(1) == "-" else int(m.group(1)), m.group(2), m.group(3))
    return out


BAD_SPECS = bad_specs()


def test_every_bad_spec_file_has_an_expectation():
    assert {p.name for p in BAD.glob("*.yaml")} == set(BAD_SPECS) | {"head_out_of_range.yaml"}
    assert len(BAD_SPECS) >= 100


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_spec_is_a_located_spec_error(name):
    line, path, pattern = BAD_SPECS[name]
    with pytest.raises(SpecError) as info:
        load_spec(BAD / name)
    err = info.value
    assert err.source.endswith(name) and str(err).startswith(str(BAD / name))
    assert err.line == line, str(err)
    if path != "*":
        assert "/".join(map(str, err.path)) == path, str(err)
    assert re.search(pattern, err.message), err.message
    if line is not None:
        assert f"{name}:{line}:" in str(err)


def test_head_out_of_range_is_reported_when_the_head_count_is_known():
    spec = load_spec(BAD / "head_out_of_range.yaml")  # valid on its own: the head count comes from the model
    assert attncc.dense_mask(spec, 8, num_heads=10).shape == (10, 8, 8)
    with pytest.raises(
        SpecError,
        match=r"head_out_of_range.yaml:5:7: at rules/0/heads/0,9: head 9 is out of range: "
        r"the attention has 8 heads \(0-7\)",
    ):
        attncc.dense_mask(spec, 8, num_heads=8)


@pytest.mark.parametrize("path", READY, ids=lambda p: p.stem)
def test_ready_spec_loads_resolves_and_matches_the_json_schema(path):
    spec = load_spec(path)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(path.read_text()), json_schema())
    grid = spec.permutation(0)
    n = 64 if grid is None else grid.size
    tile = yaml.safe_load(path.read_text())["rules"][0].get("mask", {})
    if isinstance(tile, dict) and "text" in tile.get("tile3d", {}):  # a joint text + video layout
        t = tile["tile3d"]
        n = t["grid"][0] * t["grid"][1] * t["grid"][2] + t["text"]["tokens"]
    for layer in range(24):
        policy = resolve(spec, layer, "model.layers.0.self_attn", 8)
        assert policy is not None and len(policy.head_to_program) == 8
        mask = attncc.dense_mask(spec, n, num_heads=8, layer=layer, module="model.layers.0.self_attn")
        assert mask.shape == (8, n, n) and mask.any()


def test_layer_groups_and_first_match_wins():
    spec = load_spec(ROOT / "specs" / "masformer.yaml")
    names = [spec.rule_name(spec.match(layer)) for layer in range(17)]
    assert names[:3] == ["full-layers-bottom", "full-layers-bottom", "local-layers"]
    assert [i for i, n in enumerate(names) if n == "full-layers-periodic"] == [7, 15]
    longgen = load_spec(ROOT / "specs" / "longgen.yaml")
    assert [longgen.rule_name(longgen.match(x)) for x in (0, 7, 8, 15, 16, 40)] == [
        "sink-window",
        "sink-window",
        "middle-full",
        "middle-full",
        "sink-window",
        "sink-window",
    ]


@pytest.mark.parametrize(
    "layers, chosen",
    [
        ("3,7,11", [3, 7, 11]),
        ("2-", list(range(2, 12))),
        ("0-1", [0, 1]),
        (5, [5]),
        ([1, 4], [1, 4]),
        ({"every": 4, "offset": 3}, [3, 7, 11]),
        ({"every": 5}, [0, 5, 10]),
    ],
    ids=str,
)
def test_layer_selectors(layers, chosen):
    spec = load_spec({"attncc": 1, "rules": [{"where": {"layers": layers}, "mask": "causal"}]})
    assert [x for x in range(12) if spec.match(x) is not None] == chosen


def test_module_glob_and_where_combination():
    spec = load_spec(
        {
            "attncc": 1,
            "rules": [
                {"where": {"module": "*.self_attn", "layers": "0-1"}, "mask": {"window": 4}},
                {"where": {"module": "*.cross_attn"}, "mask": "full"},
            ],
        }
    )
    assert spec.match(0, "model.layers.0.self_attn") == 0
    assert spec.match(2, "model.layers.2.self_attn") is None
    assert spec.match(2, "model.layers.2.cross_attn") == 1


def test_head_policies_resolve_per_head():
    spec = load_spec(ROOT / "specs" / "duo.yaml")
    mask = attncc.dense_mask(spec, 300, num_heads=8)
    causal = M.dense(M.Causal(), 300, 300)[0]
    for h in range(8):
        assert torch.equal(mask[h], causal) == (h in (0, 3, 6, 7)), h
    assert mask[1, 299, :16].all() and not mask[1, 299, 16 : 299 - 256 + 1].any() and mask[1, 299, 44:].all()


def test_unmatched_site_is_dense():
    spec = load_spec({"attncc": 1, "rules": [{"where": {"layers": 0}, "mask": "causal"}]})
    assert attncc.dense_mask(spec, 5, layer=1).all()
    assert resolve(spec, 1, "", 4) is None


@pytest.mark.parametrize(
    "rule, what",
    [
        (
            {"mask": {"any": [{"topk": {"k": 4}}, {"topk": {"k": 2, "score": "draft"}}]}},
            "the data-dependent selector 'topk' (mask {any: [{topk: {k: 4}}, {topk: {k: 2, score: draft}}]} combines 2",
        ),
        (
            {"mask": "causal", "heads": {"1": {"all": ["causal", {"threshold": {"tau": 0.9, "block": 48}}]}}},
            "the data-dependent selector 'threshold' ({threshold: {block: 48, tau: 0.9}}: block 48 must be a multiple",
        ),
        ({"mask": "causal", "permute": {"by": "key_importance", "segment": 64}}, "the run-time permutation"),
        ({"mask": "causal", "reuse": {"from": 0, "refresh_every": 4}}, "'reuse' of a block selection"),
    ],
    ids=["topk", "threshold_in_head", "permute_by", "reuse"],
)
def test_dynamic_constructs_are_validated_but_refused_at_bind_time(rule, what):
    spec = load_spec({"attncc": 1, "rules": [dict(rule, name="dyn")]})
    with pytest.raises(SpecError, match=re.escape(f"rule 'dyn' uses {what}") + ".*cannot execute yet"):
        check_executable(spec, 0)
    with pytest.raises(SpecError, match="cannot execute yet"):
        resolve(spec, 0, "", 4)


def test_static_rule_is_executable():
    spec = load_spec(ROOT / "specs" / "video_tile.yaml")
    check_executable(spec, 0)
    policy = resolve(spec, 0, "", 2)
    assert policy.permute is not None and policy.permute.size == 1024 and (policy.block_q, policy.block_kv) == (16, 16)


def test_spec_error_from_a_dict_names_the_key_path():
    with pytest.raises(SpecError, match=r"<dict>: at rules/0/mask/any/0/sink: sink must be an integer >= 1"):
        load_spec({"attncc": 1, "rules": [{"mask": {"any": [{"sink": "4"}]}}]})


def test_alias_cycles_and_bombs_are_spec_errors():
    with pytest.raises(SpecError, match="cycle"):
        load_spec("attncc: 1\nrules: &r [*r]\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcde", "bcdef")
    )
    with pytest.raises(SpecError, match="more than .* YAML nodes"):
        load_spec(bomb + "attncc: 1\nrules: [{mask: causal}]\n")


def test_non_utf8_file_and_wrong_types(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"attncc: 1\nname: caf\xe9\nrules: [{mask: causal}]\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(f)
    with pytest.raises(SpecError, match="got int"):
        load_spec(42)
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.yaml")


# -- fuzz: nothing but SpecError escapes load_spec --------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 3000),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from(["causal", "full", "window", "sink", "0-1", "2-", "*", "topk", "1,x"]),
)
_KEYS = st.sampled_from(
    [
        "attncc",
        "rules",
        "mask",
        "masks",
        "where",
        "layers",
        "module",
        "heads",
        "permute",
        "grid",
        "tile",
        "window",
        "sink",
        "all",
        "any",
        "not",
        "topk",
        "k",
        "tau",
        "score",
        "block_size",
        "q",
        "kv",
        "every",
        "offset",
        "before",
        "after",
        "tile3d",
        "random_blocks",
        "n",
        "seed",
        "reuse",
        "by",
        "0,3",
        "name",
        "x",
    ]
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(_KEYS, st.integers(0, 3)), inner, max_size=4)
    ),
    max_leaves=12,
)
FUZZ = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_spec_errors(src):
    try:
        load_spec(src)
    except SpecError as e:
        assert "could not read the spec" not in e.message, f"unexpected internal error for {src!r}: {e}"


@FUZZ
@given(body=st.dictionaries(_KEYS, _VALUES, max_size=5), version=st.sampled_from([1, 1, 1, 2, "1", None, True]))
def test_fuzzed_dicts_raise_only_spec_errors(body, version):
    data = dict(body, attncc=version) if version is not None else body
    _only_spec_errors(data)
    _only_spec_errors(yaml.safe_dump(data))


@FUZZ
@given(
    text=st.text(
        alphabet=st.sampled_from(list("attncc: 1\nrules-[]{},&*!|>'\"#%@`?:mask causal window 0-9")), max_size=80
    )
)
def test_fuzzed_yaml_text_raises_only_spec_errors(text):
    _only_spec_errors("attncc: 1\n" + text + "\n")


@pytest.mark.parametrize("as_text", [False, True], ids=["path", "text"])
def test_bad_specs_fail_fast_and_small(as_text):
    """Every hostile file, as a path and as YAML text, is refused within 2 s and 300 MB of Python
    allocations (the slowest and largest are printed for the record)."""
    import time
    import tracemalloc

    worst_time, worst_mem = ("", 0.0), ("", 0)
    for name in BAD_SPECS:
        src = (BAD / name).read_text() if as_text else BAD / name
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(SpecError):
            load_spec(src)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert dt < 2.0, f"{name}: {dt:.2f} s"
        assert peak < 300 << 20, f"{name}: {peak >> 20} MB"
        worst_time = max(worst_time, (name, dt), key=lambda x: x[1])
        worst_mem = max(worst_mem, (name, peak), key=lambda x: x[1])
    print(f"slowest {worst_time[0]} {worst_time[1]:.3f} s; largest {worst_mem[0]} {worst_mem[1] / 2**20:.1f} MB")


def test_spec_size_limit(tmp_path):
    """A spec over 1 MB is refused before it is parsed, as a file and as text."""
    text = "attncc: 1\ndescription: '" + "x" * (1 << 20) + "'\nrules:\n  - mask: causal\n"
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    for src in (path, text):
        with pytest.raises(SpecError, match="larger than 1048576 bytes"):
            load_spec(src)


def test_uni_encoder_spec_is_context_plus_own_candidate():
    """specs/uni_encoder.yaml against the layout written out: 200 context tokens, candidates of 64."""
    n, c, size = 200 + 4 * 64, 200, 64
    got = attncc.dense_mask(attncc.load_spec(ROOT / "specs" / "uni_encoder.yaml"), n)[0]
    pos = torch.arange(n)
    cand = torch.where(pos < c, -1, (pos - c) // size)  # -1: context
    want = (pos[None, :] < c) | ((cand[:, None] == cand[None, :]) & (cand[:, None] >= 0))
    want |= (pos[:, None] < c) & (pos[None, :] < c)
    assert torch.equal(got, want)


def test_anchor_attention_spec_is_causal_documents_plus_anchor():
    n, doc = 3 * 2048, 2048
    got = attncc.dense_mask(attncc.load_spec(ROOT / "specs" / "anchor_attention.yaml"), n)[0]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = (k <= q) & ((k == 0) | (q // doc == k // doc))
    assert torch.equal(got, want)
