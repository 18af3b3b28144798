"""Selectors through ``torch.compile(backend="attncc")`` on a tiny Llama, checked against the eager
model whose attention applies the selected mask (estimated by the torch reference from the same
q/k), and the ready specs of the data-dependent systems."""

from __future__ import annotations

import pathlib

import pytest
import torch
from support import rule_plan, tiny_llama

import attncc
from attncc.codegen.selectors import layout as SL
from attncc.codegen.selectors import run as S
from attncc.counters import counters
from attncc.ir import masks as M
from attncc.spec import SpecError, check_executable, load_spec

transformers = pytest.importorskip("transformers")

SPECS = pathlib.Path(__file__).resolve().parent.parent / "specs" / "dynamic"


def selected_reference_attention(spec):
    """An eager attention function: the spec rule's mask with its selection estimated by the torch
    reference, applied densely (explicit softmax, independent of the attncc executors)."""
    spec = load_spec(spec)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        h = query.shape[1]
        plan = rule_plan(spec, module.layer_idx, query, key, value, scaling)
        allowed = SL.dense_selected_mask(plan, S.select_blocks(plan, query, key))
        g = h // key.shape[1]
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        scores = (query @ k.transpose(-1, -2)) * scaling
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return (p @ v).transpose(1, 2).contiguous(), None

    return attention


TOPK_SPEC = {
    "attncc": 1,
    "block_size": 16,
    "rules": [
        {"name": "first", "where": {"layers": 0}, "mask": {"any": [{"sink": 16}, {"window": 16}, {"topk": {"k": 2}}]}},
        {
            "name": "rest",
            "mask": {"threshold": {"tau": 0.6, "score": "antidiagonal", "stride": 4}},
            "heads": {"0": "causal"},
        },
    ],
}


def reference_logits(model, spec, ids):
    """The model's logits with the spec's selection applied by a reference attention function
    (restoring its sdpa attention afterwards)."""
    transformers.AttentionInterface.register("attncc_selected_ref", selected_reference_attention(spec))
    model.config._attn_implementation = "attncc_selected_ref"
    with torch.no_grad():
        want = model(ids).logits
    model.config._attn_implementation = "sdpa"
    return want


def test_compiled_llama_equals_reference_with_selected_mask():
    executor = "interpret"
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(1))
    want = reference_logits(model, TOPK_SPEC, ids)
    with torch.no_grad():
        dense = model(ids).logits
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="attncc", options={"spec": TOPK_SPEC, "executor": executor, "inner": "eager"}
    )
    with torch.no_grad():
        got = compiled(ids).logits
    assert counters["rewritten"] == 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the selection is a real restriction: the output is not the dense model's
    assert (got - dense).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["xattention", "moba", "vmoba", "draft"])
def test_ready_selector_specs_compile_and_run(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    for i in range(len(spec.rules)):
        check_executable(spec, i)
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(2))
    want = reference_logits(model, spec, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attncc", options={"spec": spec, "executor": "torch", "inner": "eager"})
    with torch.no_grad():
        got = compiled(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_dense_mask_api_refuses_selectors_with_the_reason():
    spec = load_spec(SPECS / "moba.yaml")
    with pytest.raises((SpecError, M.MaskError, ValueError)):
        attncc.dense_mask(spec, 64, num_heads=2)
