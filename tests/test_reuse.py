"""Selections that outlive one call: reuse across layers (DELTA / TidalDecode) as an explicit graph
value, reuse across calls (SparseD) with a reset, and the run-time key order of PBS-Attn. The
compiled models are checked against an eager attention that applies the selected mask densely
(explicit softmax); the selection itself is estimated by the torch reference, whose agreement with
the Triton kernels is tested in test_selectors.py. fp32 throughout, atol 1e-4 on logits."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from support import rule_plan, tiny_llama

import attncc
from attncc.backend import Options, attncc_backend
from attncc.codegen.selectors import layout as SL
from attncc.codegen.selectors import reference as SR
from attncc.codegen.selectors import run as S
from attncc.counters import counters
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan
from attncc.spec import SpecError, check_executable, load_spec

transformers = pytest.importorskip("transformers")

SPECS = pathlib.Path(__file__).resolve().parent.parent / "specs" / "dynamic"
SEL = {"any": [{"sink": 16}, {"window": 16}, {"topk": {"k": 1}}]}


pytestmark = pytest.mark.usefixtures("fresh_compiler")


def ids(n, seed):
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


class Reference:
    """Eager attention for HF models under a spec: selections estimated by the torch reference,
    reused across layers as the spec says, and for call reuse as ``call_mode`` says
    (``dense``: the causal model mask; ``fresh``: select and store; ``stored``: the stored one)."""

    def __init__(self, spec):
        self.spec = load_spec(spec)
        self.by_rule: dict = {}
        self.by_layer: dict = {}
        self.stored: dict = {}
        self.call_mode = "fresh"

    def allowed(self, module, query, key, value, scaling):
        layer = module.layer_idx
        i = self.spec.match(layer, "")
        rule, name = self.spec.rules[i], self.spec.rule_name(i)
        plan = rule_plan(self.spec, layer, query, key, value, scaling)
        if rule.permute is not None and rule.permute.by is not None:
            order = SR.key_order(query, key, rule.permute.segment)
            return SR.dense_permuted_mask(plan, SR.select_permuted(plan, query, key, order), order)
        reuse = rule.reuse
        if reuse is not None and reuse.from_ is not None:
            source = reuse.from_
            selected = self.by_layer[source] if isinstance(source, int) else self.by_rule[source]
        elif reuse is not None and self.call_mode == "dense":
            sq, skv = query.shape[2], key.shape[2]
            return torch.ones(sq, skv, dtype=torch.bool).tril()
        elif reuse is not None and self.call_mode == "stored":
            selected = self.stored[layer]
        else:
            selected = S.select_blocks(plan, query, key)
            self.stored[layer] = selected
        self.by_rule[name] = self.by_layer[layer] = selected
        return SL.dense_selected_mask(plan, selected)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        allowed = self.allowed(module, query, key, value, scaling)
        g = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        scores = (query @ k.transpose(-1, -2)) * scaling
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return (p @ v).transpose(1, 2).contiguous(), None


def eager_logits(model, reference, x):
    name = f"attncc_reuse_ref_{id(reference)}"
    transformers.AttentionInterface.register(name, reference)
    model.config._attn_implementation = name
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        model.config._attn_implementation = "sdpa"


def compile_with_graphs(model, **options):
    """torch.compile through the attncc backend, keeping the rewritten graphs."""
    graphs = []

    def backend(gm, example_inputs):
        fn = attncc_backend(gm, example_inputs, options={"executor": "torch", "inner": "eager", **options})
        graphs.append(gm)
        return fn

    return torch.compile(model, backend=backend), graphs


def op_counts(graphs, *names):
    code = "\n".join(g.code for g in graphs)
    return tuple(code.count(f"torch.ops.attncc.{n}.default(") for n in names)


# -- reuse across layers ---------------------------------------------------------------------------
def delta_spec(source):
    return {
        "attncc": 1,
        "block_size": 16,
        "rules": [
            {"name": "dense", "where": {"layers": 0}, "mask": "full"},
            {"name": "select", "where": {"layers": 1}, "mask": SEL},
            {"name": "reuse", "where": {"layers": "2-"}, "mask": SEL, "reuse": {"from": source}},
        ],
    }


@pytest.mark.parametrize("source", ["select", 1], ids=["from_rule", "from_layer"])
def test_layers_2_3_reuse_the_selection_of_layer_1(source):
    model = tiny_llama(layers=4)
    x = ids(70, seed=1)
    spec = delta_spec(source)
    want = eager_logits(model, Reference(spec), x)
    compiled, graphs = compile_with_graphs(model, spec=spec)
    with torch.no_grad():
        got = compiled(x).logits
    assert counters["rewritten"] == 4
    # layer 1 returns its selection; layers 2 and 3 take that value; nothing else selects
    assert op_counts(graphs, "attention_select", "attention_reuse", "attention") == (1, 2, 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # reuse is real: layers selecting for themselves give a different output
    own = delta_spec(source)
    del own["rules"][2]["reuse"]
    assert (eager_logits(model, Reference(own), x) - want).abs().max() > 1e-3


def test_selection_threads_through_the_graph_as_a_value_under_interpret():
    """attention_select's third output, fed to attention_reuse, under the Triton interpreter."""
    prog = M.All((M.Causal(), M.Any_((M.Sink(16), M.Window(15, 0), M.Selector("topk", (("k", 1),))))))
    plan = AttentionPlan((prog,), (0, 0), 2, 1, 50, 50, 16, 16, "float32", 0.25, 16, 16, rule="r")
    from attncc.runtime import registry

    key = registry.register_plan(plan)
    g = torch.Generator().manual_seed(0)
    q1, q2 = torch.randn(2, 1, 2, 50, 16, generator=g)
    k, v = torch.randn(2, 1, 1, 50, 16, generator=g)
    out1, _, selected = torch.ops.attncc.attention_select(q1, k, v, None, None, None, key, "interpret")
    out2, _ = torch.ops.attncc.attention_reuse(q2, k, v, None, None, None, selected, key, "interpret")
    assert torch.equal(selected, S.select_blocks(plan, q1, k))
    for q, out in ((q1, out1), (q2, out2)):
        ref, _ = S.attend(plan, q, k, v, None, selected)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"rule 'r'.*needs bool \(1, 2, 4, 4\)"):
        torch.ops.attncc.attention_reuse(q2, k, v, None, None, None, selected[:, :1], key, "torch")


class Attn(torch.nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        q = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()


class TwoLengths(torch.nn.Module):
    """Two causal SDPA attentions ``layers.0`` / ``layers.1``; the second sees ``short`` tokens."""

    def __init__(self, short, heads=(2, 2)):
        super().__init__()
        self.short = short
        self.layers = torch.nn.ModuleList([Attn(h) for h in heads])

    def forward(self, x):
        return self.layers[0](x) + self.layers[1](x[:, : self.short])


@pytest.mark.parametrize(
    "rules, short, heads, message",
    [
        (
            [{"name": "sel", "where": {"layers": 0}, "mask": SEL}, {"name": "use", "mask": SEL, "reuse": {"from": 0}}],
            32,
            (2, 2),
            r"rule 'use' at layers.1 \(layer 1\) reuses the selection of layers.0 \(layer 0\).*query lengths differ "
            r"\(64 there, 32 here\)",
        ),
        (
            [{"name": "sel", "where": {"layers": 0}, "mask": SEL}, {"name": "use", "mask": SEL, "reuse": {"from": 0}}],
            64,
            (2, 4),
            r"rule 'use'.*query heads differ \(2 there, 4 here\)",
        ),
        (
            [
                {"name": "use", "where": {"layers": 0}, "mask": SEL, "reuse": {"from": "sel"}},
                {"name": "sel", "mask": SEL},
            ],
            64,
            (2, 2),
            r"rule 'use' at layers.0 \(layer 0\) reuses the selection of rule 'sel', but no attention bound to it "
            r"runs before this one",
        ),
        (
            [
                {"name": "sel", "where": {"layers": 0}, "mask": SEL},
                {"name": "use", "mask": {"any": ["causal", {"topk": {"k": 2}}]}, "reuse": {"from": "sel"}},
            ],
            64,
            (2, 2),
            r"rule 'use'.*head 0's selector \{topk: \{k: 2\}\} is not the one computed there \(\{topk: \{k: 1\}\}\)",
        ),
        (
            [
                {"name": "first", "where": {"layers": 0}, "mask": "causal"},
                {"name": "use", "mask": SEL, "reuse": {"from": 0}},
            ],
            64,
            (2, 2),
            r"rule 'use'.*head 0's selector \{topk: \{k: 1\}\} is not the one computed there \(none",
        ),
    ],
    ids=["q_len", "heads", "producer_after_consumer", "other_selector", "producer_selects_nothing"],
)
def test_layer_reuse_refusals_name_the_rule(rules, short, heads, message):
    spec = {"attncc": 1, "block_size": 16, "rules": rules}
    compiled = torch.compile(TwoLengths(short, heads), backend="attncc", options={"spec": spec, "inner": "eager"})
    with pytest.raises(Exception, match=message) as info:
        compiled(torch.randn(1, 64, 32))
    assert "SpecError" in repr(info.value) or isinstance(info.value, SpecError)


# -- reuse across calls ----------------------------------------------------------------------------
def sparsed_spec():
    return {
        "attncc": 1,
        "block_size": 16,
        "rules": [{"name": "sparsed", "mask": SEL, "reuse": {"dense_first": 2, "refresh_every": 2}}],
    }


def test_call_reuse_over_five_calls_and_reset():
    """dense, dense, select, reuse, select; after reset dense again; one compile throughout."""
    model = tiny_llama(layers=1)
    spec = sparsed_spec()
    cache = attncc.SelectionCache()
    compiled, graphs = compile_with_graphs(model, spec=spec, selection_cache=cache)
    ref = Reference(spec)
    inputs = [ids(64, seed=10 + c) for c in range(6)]
    plan_modes = ["dense", "dense", "fresh", "stored", "fresh"]
    outs = []
    for c, mode in enumerate(plan_modes):
        ref.call_mode = mode
        want = eager_logits(model, ref, inputs[c])
        with torch.no_grad():
            got = compiled(inputs[c]).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, c=c: f"call {c}: {m}")
        outs.append(got)
        if mode == "stored":
            # the reused selection differs from a fresh one for this input: reuse is observable
            ref.call_mode = "fresh"
            stored = dict(ref.stored)
            assert (eager_logits(model, ref, inputs[c]) - got).abs().max() > 1e-3
            ref.stored = stored
    (site,) = cache.state()
    assert cache.state()[site] == (5, 2)
    with torch.no_grad():
        dense = model(inputs[0]).logits
    torch.testing.assert_close(outs[0], dense, atol=1e-4, rtol=0)
    attncc.reset_selection(cache)
    assert cache.state() == {}
    ref.call_mode = "dense"
    with torch.no_grad():
        got = compiled(inputs[5]).logits
    torch.testing.assert_close(got, eager_logits(model, ref, inputs[5]), atol=1e-4, rtol=0)
    # state lives outside the graph: phases and the reset never recompiled
    assert counters["graphs"] == 1 and len(graphs) == 1
    assert op_counts(graphs, "attention_cached", "attention") == (1, 0)


def test_call_reuse_recomputes_when_the_shape_changes_and_without_refresh_keeps_one():
    spec = {"attncc": 1, "block_size": 16, "rules": [{"name": "once", "mask": SEL, "reuse": {"dense_first": 0}}]}
    model = tiny_llama(layers=1)
    cache = attncc.SelectionCache()
    compiled, _ = compile_with_graphs(model, spec=spec, selection_cache=cache)
    ref = Reference(spec)
    for n, (length, mode) in enumerate([(48, "fresh"), (48, "stored"), (64, "fresh"), (64, "stored")]):
        ref.call_mode = mode
        x = ids(length, seed=20 + n)
        with torch.no_grad():
            got = compiled(x).logits
        torch.testing.assert_close(got, eager_logits(model, ref, x), atol=1e-4, rtol=0)
    assert list(cache.state().values()) == [(4, 2)]


def test_reset_selection_rejects_other_objects():
    with pytest.raises(TypeError, match="SelectionCache"):
        attncc.reset_selection(object())
    with pytest.raises(ValueError, match="selection_cache: expected an attncc.SelectionCache"):
        Options.parse({"selection_cache": 3})


# -- run-time key permutation ----------------------------------------------------------------------
def test_key_order_sorts_each_segment_by_importance():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 30, 8, generator=g)
    k = torch.randn(2, 2, 37, 8, generator=g)
    k[0, 0, 3] = k[0, 0, 5]  # a tie: the lower position goes first
    order = SR.key_order(q, k, 16)
    for b in range(2):
        for j in range(2):
            qbar = q[b, 2 * j : 2 * j + 2].reshape(-1, 8).mean(0)
            imp = [float(k[b, j, p] @ qbar) for p in range(37)]
            want = []
            for start in range(0, 37, 16):
                seg = list(range(start, min(start + 16, 37)))
                want += sorted(seg, key=lambda p: (-imp[p], p))
            assert order[b, j].tolist() == want


def pbs_plan(heads=4, kv_heads=2, length=100, block=16, mask_kind=None):
    sel = M.Selector("threshold", (("tau", 0.7),))
    prog = M.All((M.Causal(), M.Any_((M.Window(15, 0), sel))))
    return AttentionPlan(
        (prog,), (0,) * heads, heads, kv_heads, length, length, 16, 16, "float32", 0.25, block, block,
        mask_kind=mask_kind, rule="pbs",
    )  # fmt: skip


def test_selection_in_the_identity_order_is_the_model_order_selection():
    plan = pbs_plan()
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 100, 16, generator=g), torch.randn(1, 2, 100, 16, generator=g)
    identity = torch.arange(100).expand(1, 2, 100)
    assert torch.equal(SR.select_permuted(plan, q, k, identity), S.select_blocks(plan, q, k))


@pytest.mark.parametrize(
    "length, segment, mask_kind",
    [(100, 32, None), (64, 64, "bool"), (77, 48, "additive")],
    ids=["awkward_100_seg32", "one_segment_bool_mask", "77_seg48_additive"],
)
def test_permuted_attention_equals_reference_with_the_mask_mapped_back(length, segment, mask_kind):
    plan = pbs_plan(length=length, mask_kind=mask_kind)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, length, 16, generator=g)
    k, v = torch.randn(2, 2, 2, length, 16, generator=g)
    mask = None
    if mask_kind is not None:
        keep = torch.rand(2, 1, length, length, generator=g) > 0.2
        mask = keep if mask_kind == "bool" else torch.where(keep, torch.randn(keep.shape, generator=g), -torch.inf)
    out, lse = S.run_permuted(plan, q, k, v, mask, segment)
    order = SR.key_order(q, k, segment)
    allowed = SR.dense_permuted_mask(plan, SR.select_permuted(plan, q, k, order), order)
    assert not torch.equal(order, torch.arange(length).expand_as(order))
    want, want_lse = S._attend_dense(plan, q, k, v, mask, allowed)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=0)
    # the order matters: selecting in model order gives another mask
    assert not torch.equal(allowed, SL.dense_selected_mask(plan, S.select_blocks(plan, q, k)))


def test_compiled_llama_with_runtime_key_order_equals_reference():
    spec = {
        "attncc": 1,
        "block_size": 16,
        "rules": [{"name": "pbs", "mask": SEL, "permute": {"by": "key_importance", "segment": 32}}],
    }
    model = tiny_llama(layers=2)
    x = ids(80, seed=3)
    want = eager_logits(model, Reference(spec), x)
    compiled, graphs = compile_with_graphs(model, spec=spec)
    with torch.no_grad():
        got = compiled(x).logits
    assert op_counts(graphs, "attention_permuted", "attention") == (2, 0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_runtime_key_order_runs_on_the_interpreter_as_on_torch():
    rule = {"name": "pbs", "mask": SEL, "permute": {"by": "key_importance", "segment": 32}}
    spec = {"attncc": 1, "block_size": 16, "rules": [rule]}
    model, x = TwoLengths(48), torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(4))
    got = {}
    for executor in ("interpret", "torch"):
        torch._dynamo.reset()
        options = {"spec": spec, "inner": "eager", "executor": executor}
        with torch.no_grad():
            got[executor] = torch.compile(model, backend="attncc", options=options)(x)
    torch.testing.assert_close(got["interpret"], got["torch"], atol=1e-4, rtol=1e-6)  # sums of 4k outputs


# -- static checks and ready specs -----------------------------------------------------------------
@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"mask": SEL, "reuse": {}}], r"'reuse' of a block selection \(give 'from'"),
        ([{"mask": SEL, "reuse": {"from": 0, "dense_first": 1}}], "cannot be combined in one rule"),
        ([{"mask": "causal", "reuse": {"dense_first": 1}}], "has no topk/threshold selector"),
        ([{"mask": SEL, "reuse": {"from": "Sel"}}, {"name": "sel", "mask": SEL}], r"no rule is named 'Sel' \(did you"),
        ([{"mask": SEL, "reuse": {"from": "dyn"}}], "cannot reuse its own selection"),
        ([{"mask": SEL, "reuse": {"from": "c"}}, {"name": "c", "mask": "causal"}], "rule 'c' has no topk/threshold"),
        (
            [{"mask": SEL, "reuse": {"from": "c"}}, {"name": "c", "mask": SEL, "reuse": {"dense_first": 1}}],
            "reuses its selection across calls",
        ),
        ([{"mask": SEL, "permute": {"by": "key_importance"}}], "give 'segment'"),
        ([{"mask": "causal", "permute": {"by": "key_importance", "segment": 64}}], "changes nothing"),
        ([{"mask": SEL, "permute": {"by": "key_importance", "segment": 40}}], "segment 40 must be a multiple of"),
        (
            [{"mask": SEL, "permute": {"by": "key_importance", "segment": 64}, "reuse": {"dense_first": 1}}],
            "cannot be combined with a run-time permutation",
        ),
    ],
    ids=[
        "empty_reuse",
        "from_and_calls",
        "no_selector",
        "unknown_rule",
        "self",
        "producer_without_selector",
        "producer_call_reuse",
        "no_segment",
        "permute_without_selector",
        "segment_not_multiple",
        "reuse_and_permute",
    ],
)
def test_static_refusals_name_the_rule(rules, message):
    spec = load_spec({"attncc": 1, "rules": [dict(rules[0], name="dyn"), *rules[1:]]})
    with pytest.raises(SpecError, match=f"rule 'dyn' uses .*{message}"):
        check_executable(spec, 0)


@pytest.mark.parametrize("name, layers", [("delta", 3), ("sparsed", 1), ("pbs", 1)])
def test_ready_reuse_and_permutation_specs_run(name, layers):
    spec = load_spec(SPECS / f"{name}.yaml")
    for i in range(len(spec.rules)):
        check_executable(spec, i)
    model = tiny_llama(layers=layers)
    x = ids(128, seed=4)
    ref = Reference(spec)
    ref.call_mode = "dense"
    want = eager_logits(model, ref, x)
    compiled, _ = compile_with_graphs(model, spec=spec, selection_cache=attncc.SelectionCache())
    with torch.no_grad():
        got = compiled(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
