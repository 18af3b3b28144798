"""The attncc torch.compile backend on SDPA sites: rewrite, counters, recompiles, options, autograd, dump."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.config import config
from attncc.counters import counters
from attncc.ir.masks import Causal, Full
from attncc.ir.plan import AttentionPlan
from attncc.runtime import registry

EAGER = {"inner": "eager", "executor": "reference"}


class Sdpa(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw) * 2.0


def qkv(b=2, h=4, hkv=4, sq=24, skv=24, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, sq, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, skv, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, skv, d, generator=g, dtype=dtype),
    )


def compile_(m, **opts):
    return torch.compile(m, backend="attncc", options={**EAGER, **opts}, fullgraph=True)


pytestmark = pytest.mark.usefixtures("fresh_compiler")


def _bool_mask(sq, skv, seed=1):
    m = torch.rand(sq, skv, generator=torch.Generator().manual_seed(seed)) > 0.4
    m[:, 0] = True
    return m


@pytest.mark.parametrize(
    "kw,mask,shape",
    [
        ({}, None, {}),
        ({"is_causal": True}, None, {}),
        ({"is_causal": True}, None, {"sq": 17, "skv": 17}),
        ({}, "bool", {}),
        ({}, "additive", {}),
        ({"scale": 0.3}, None, {}),
        ({"enable_gqa": True, "is_causal": True}, None, {"h": 4, "hkv": 2}),
        ({}, "bool", {"sq": 8, "skv": 40}),
    ],
    ids=["plain", "causal", "causal-odd-len", "bool-mask", "additive-mask", "scale", "gqa", "cross-attn"],
)
def test_sdpa_rewritten_equal(kw, mask, shape):
    q, k, v = qkv(**shape)
    m = None
    if mask == "bool":
        m = _bool_mask(q.shape[2], k.shape[2])
    elif mask == "additive":
        m = torch.randn(1, 1, q.shape[2], k.shape[2]) * 2
    mod = Sdpa(**kw)
    ref = mod(q, k, v, m)
    out = compile_(mod)(q, k, v, m)
    assert counters["detected"] == 1 and counters["rewritten"] == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_backend_by_entry_point_and_options_reach_it(tmp_path):
    from importlib.metadata import entry_points

    names = [e.name for e in entry_points(group="torch_dynamo_backends")]
    assert "attncc" in names
    q, k, v = qkv()
    compile_(Sdpa(is_causal=True), dump_dir=str(tmp_path))(q, k, v)
    assert len(list(tmp_path.iterdir())) == 1


def test_bad_option_is_named():
    q, k, v = qkv()
    with pytest.raises(Exception, match="executor='nope'"):
        compile_(Sdpa(), executor="nope")(q, k, v)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown attncc option"):
        compile_(Sdpa(), exectuor="torch")(q, k, v)


def test_no_recompile_same_shape_and_one_per_new_length():
    frames = []
    mod = Sdpa(is_causal=True)
    c = torch.compile(mod, backend=lambda gm, ex: frames.append(1) or attncc.backend.attncc_backend(gm, ex, EAGER))
    for sq in (16, 16, 24, 24, 40, 40):
        q, k, v = qkv(sq=sq, skv=sq)
        torch.testing.assert_close(c(q, k, v), mod(q, k, v), atol=1e-5, rtol=1e-5)
    # 16: static graph; 24: one recompile with a dynamic length; 40: reuses the dynamic graph
    assert len(frames) == 2
    assert counters["rewritten"] == 2


def test_dynamic_plan_resized_at_run_time():
    mod = Sdpa(is_causal=True)
    c = torch.compile(mod, backend="attncc", options=EAGER, dynamic=True)
    for sq in (12, 20):
        q, k, v = qkv(sq=sq, skv=sq)
        torch.testing.assert_close(c(q, k, v), mod(q, k, v), atol=1e-5, rtol=1e-5)


def test_inductor_inner():
    q, k, v = qkv(sq=16, skv=16)
    mod = Sdpa(is_causal=True)
    out = torch.compile(mod, backend="attncc", options={"executor": "reference"}, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, mod(q, k, v), atol=1e-5, rtol=1e-5)
    assert counters["rewritten"] == 1


@pytest.mark.parametrize("executor", ["torch", "auto"])
def test_cpu_executors(executor):
    q, k, v = qkv(h=4, hkv=2, sq=33, skv=33)
    mod = Sdpa(is_causal=True, enable_gqa=True)
    out = compile_(mod, executor=executor)(q, k, v)
    torch.testing.assert_close(out, mod(q, k, v), atol=1e-4, rtol=1e-4)


def _plan(h=2, hkv=1, s=9, d=4, causal=True, mask_kind=None):
    mask = Causal() if causal else Full()
    return AttentionPlan.of(
        mask, num_heads=h, num_kv_heads=hkv, q_len=s, head_dim=d, dtype="float64", mask_kind=mask_kind
    )


def test_op_reference_backward_gradcheck():
    key = registry.register_plan(_plan(mask_kind="additive"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.randn(1, 1, 9, 9, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.attncc.attention(q, k, v, mask, None, None, key, "reference")[0], (q, k, v)
    )


def test_op_backward_matches_autograd_of_sdpa():
    q, k, v = (t.double().requires_grad_(True) for t in qkv(b=1, h=2, hkv=2, sq=10, skv=10, d=8))
    mod = Sdpa(is_causal=True)
    c = compile_(mod)
    c(q, k, v).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    mod(q, k, v).sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-8, rtol=1e-8)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = registry.register_plan(_plan(h=4, hkv=2, s=8, d=4, causal=False))
    with FakeTensorMode():
        q, k, v = torch.empty(3, 4, 8, 4), torch.empty(3, 2, 8, 4), torch.empty(3, 2, 8, 4)
        out, lse = torch.ops.attncc.attention(q, k, v, None, None, None, key, "reference")
    assert tuple(out.shape) == (3, 4, 8, 4) and tuple(lse.shape) == (3, 4, 8) and lse.dtype == torch.float32


def test_spec_policies_on_sdpa_site():
    spec = {"attncc": 1, "rules": [{"mask": {"any": [{"sink": 2}, {"window": 4}]}, "heads": {"1": "full"}}]}
    q, k, v = qkv(sq=20, skv=20)
    out = compile_(Sdpa(is_causal=True), spec=spec)(q, k, v)
    allowed = attncc.dense_mask(spec, 20, num_heads=4) & torch.ones(20, 20, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) * 2.0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unbound_site_left_as_it_was():
    spec = {"attncc": 1, "rules": [{"where": {"module": "nothing.*"}, "mask": {"window": 2}}]}
    q, k, v = qkv()
    mod = Sdpa(is_causal=True)
    out = compile_(mod, spec=spec)(q, k, v)
    assert counters["detected"] == 1 and counters["rewritten"] == 0 and counters["unbound"] == 1
    torch.testing.assert_close(out, mod(q, k, v))


def test_strict_unmatched_rule_and_site():
    q, k, v = qkv()
    spec = {"attncc": 1, "rules": [{"mask": "full"}, {"where": {"layers": 5}, "mask": "causal"}]}
    with pytest.raises(Exception, match="rules\\[1\\].*matches no attention"):
        compile_(Sdpa(), spec=spec, strict=True)(q, k, v)
    torch._dynamo.reset()
    spec = {"attncc": 1, "rules": [{"where": {"module": "x"}, "mask": "causal"}]}
    with pytest.raises(Exception, match="no rule matches the attention"):
        compile_(Sdpa(), spec=spec, strict=True)(q, k, v)


@pytest.mark.parametrize(
    "rule,match",
    [
        (
            {"mask": {"topk": {"k": 2}}, "reuse": {"from": "rules[0]"}},
            "rules/0/reuse/from: rule 'rules\\[0\\]'.*cannot reuse its own selection",
        ),
        ({"mask": "causal", "heads": {"7": "full"}}, "rules/0/heads/7: head 7 is out of range"),
    ],
    ids=["reuse-of-own-selection", "head-out-of-range"],
)
def test_spec_errors_at_compile_time(rule, match):
    q, k, v = qkv()
    # the SpecError itself, its location first (Dynamo does not wrap it)
    with pytest.raises(attncc.SpecError, match="^<dict>: at " + match):
        compile_(Sdpa(), spec={"attncc": 1, "rules": [rule]})(q, k, v)


def test_dump_folder_and_manifest(tmp_path):
    q, k, v = qkv(h=4, hkv=2)
    spec = {"attncc": 1, "rules": [{"name": "win", "mask": {"window": 8}}]}
    compile_(Sdpa(is_causal=True, enable_gqa=True), spec=spec, dump_dir=str(tmp_path))(q, k, v)
    (folder,) = tmp_path.iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if n[:2].isdigit()] == [
        "00_input.txt",
        "01_normalize.txt",
        "02_detect.txt",
        "03_bind.txt",
        "04_rewrite.txt",
        "05_thread-selections.txt",
    ]
    assert "attncc.attention" in (folder / "04_rewrite.txt").read_text()
    man = json.loads((folder / "manifest.json").read_text())
    (site,) = man["sites"]
    assert site["rule"] == "win" and site["fx_nodes"] and site["plan_key"] in registry.plans()
    assert site["plan"]["programs"] == [{"all": [{"window": 8}, "causal"]}] and site["num_kv_heads"] == 2
    assert 0 < site["density"][0] < 1
    (kernel,) = man["kernels"]
    assert kernel["plan_key"] == site["plan_key"] and kernel["kernel"] == site["kernel"]
    assert kernel["kernel"] in (folder / kernel["file"]).read_text()
    # ATTNCC_DUMP_AOT=0 / ATTNCC_DUMP_MLIR=0: neither is attempted
    assert kernel["targets"] == {} and "mlir" not in man


def test_dump_aot_switch_reaches_the_kernel_dump(tmp_path, monkeypatch):
    import attncc.codegen.dump as dump
    from attncc.config import SETTINGS

    calls = []
    write = dump.write_kernels

    def spy(*args, **kw):
        calls.append(kw["aot"])
        return write(*args, **{**kw, "aot": False})

    monkeypatch.setattr(dump, "write_kernels", spy)
    monkeypatch.delenv("ATTNCC_DUMP_AOT", raising=False)
    # on unless switched off: a user's dump holds TTIR/PTX per GPU target
    assert SETTINGS["dump_aot"].default is True
    q, k, v = qkv()
    for aot in (True, False):
        torch._dynamo.reset()
        with config.scope(dump_aot=aot):
            compile_(Sdpa(is_causal=True), dump_dir=str(tmp_path / str(aot)))(q, k, v)
    assert calls == [True, False]


def test_dump_rewritten_graph_as_mlir(tmp_path):
    pytest.importorskip("torch_mlir")
    q, k, v = qkv(b=1, h=4, hkv=2, sq=16, skv=16)
    with config.scope(dump_mlir=True):
        compile_(Sdpa(is_causal=True, enable_gqa=True), dump_dir=str(tmp_path))(q, k, v)
    (folder,) = tmp_path.iterdir()
    man = json.loads((folder / "manifest.json").read_text())
    assert man["mlir"]["file"] == "rewritten.mlir", man["mlir"]
    text = (folder / "rewritten.mlir").read_text()
    (call,) = [line for line in text.splitlines() if "attncc" in line]
    # the custom op stays opaque: torch-mlir imports it as torch.operator with the plan key as a
    # string operand; q [1,4,16,16] and the shared kv heads [1,2,16,16] are its operands
    assert 'torch.operator "torch.attncc.attention"' in call
    assert "!torch.vtensor<[1,4,16,16],f32>, !torch.vtensor<[1,2,16,16],f32>" in call
    assert f'"{man["sites"][0]["plan_key"]}"' in text
    assert "func.func @rewritten" in text and "scaled_dot_product_attention" not in text


def test_dump_without_torch_mlir_says_why(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_mlir", None)
    q, k, v = qkv()
    with config.scope(dump_mlir=True):
        compile_(Sdpa(), dump_dir=str(tmp_path))(q, k, v)
    (folder,) = tmp_path.iterdir()
    man = json.loads((folder / "manifest.json").read_text())
    assert "torch-mlir is not installed" in man["mlir"]["error"] and not (folder / "rewritten.mlir").exists()


def test_dump_dir_from_env_config(tmp_path):
    q, k, v = qkv()
    with config.scope(dump_dir=str(tmp_path)):
        compile_(Sdpa())(q, k, v)
    assert len(list(tmp_path.iterdir())) == 1


def test_log_names_site_and_rule(capfd):
    q, k, v = qkv()
    with config.scope(log="info"):
        compile_(Sdpa(is_causal=True), spec={"attncc": 1, "rules": [{"name": "all", "mask": "full"}]})(q, k, v)
    err = capfd.readouterr().err
    assert "[attncc]" in err and "-> rule 'all'" in err


def test_config_scope_and_env(monkeypatch):
    monkeypatch.setenv("ATTNCC_STRICT", "yes")
    assert config.strict is True
    with config.scope(strict=False):
        assert config.strict is False
    monkeypatch.setenv("ATTNCC_STRICT", "maybe")
    with pytest.raises(ValueError, match="ATTNCC_STRICT"):
        _ = config.strict
    with pytest.raises(AttributeError, match="unknown attncc setting"):
        _ = config.nonexistent


class Chained(torch.nn.Module):
    """The second attention's queries are the first attention's output (no projection between)."""

    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(a, k, v)


def test_an_attention_reading_another_attentions_output():
    q, k, v = qkv(sq=24, skv=24)
    compiled = compile_(Chained())
    torch.testing.assert_close(compiled(q, k, v), Chained()(q, k, v), atol=1e-5, rtol=1e-5)
    assert counters["rewritten"] == 2


class _Dropped(torch.nn.Module):
    """An attention detection must leave alone: dropout on the probabilities in training."""

    def forward(self, q):
        p = torch.nn.functional.dropout((q @ q.transpose(-1, -2)).softmax(-1), p=0.5, training=True)
        return p @ q


def test_compile_time_spec_error_reaches_the_user_as_itself(fresh_compiler):
    """Dynamo passes the SpecError through unwrapped: its text comes first, it is a SpecError."""
    sdpa = torch.nn.Module()
    sdpa.forward = lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    q = torch.randn(1, 2, 32, 16)
    with pytest.raises(attncc.SpecError) as info:
        torch.compile(sdpa.forward, backend="attncc", options={"spec": "attncc: 1\nrules: []\n"})(q)
    assert str(info.value).startswith("<string>:2:8: at rules:")
    assert "BackendCompilerFailed" not in type(info.value).__name__


def test_strict_names_the_attentions_it_left_alone(fresh_compiler):
    spec = {"attncc": 1, "rules": [{"name": "only", "mask": {"window": 4}}]}
    compiled = torch.compile(_Dropped(), backend="attncc", options={"spec": spec, "strict": True})
    with pytest.raises(attncc.SpecError, match=r"rule 'only' matches no attention .*not rewritten: .*dropout"):
        compiled(torch.randn(1, 2, 16, 8))
