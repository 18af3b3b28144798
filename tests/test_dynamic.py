"""Selectors through ``torch.compile(backend="attncc")`` on a tiny Llama, checked against the eager
model whose attention applies the selected mask (estimated by the torch reference from the same
q/k), and the ready specs of the data-dependent systems."""

from __future__ import annotations

import pathlib

import pytest
import torch

import attncc
from attncc.codegen.selectors import layout as SL
from attncc.codegen.selectors import run as S
from attncc.counters import counters
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan
from attncc.spec import SpecError, check_executable, load_spec

transformers = pytest.importorskip("transformers")

SPECS = pathlib.Path(__file__).resolve().parent.parent / "specs" / "dynamic"


def tiny_llama(layers=2, impl="sdpa"):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def selected_reference_attention(spec):
    """An eager attention function: the spec rule's mask with its selection estimated by the torch
    reference, applied densely (explicit softmax, independent of the attncc executors)."""
    spec = load_spec(spec)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, sq, d = query.shape
        layer = module.layer_idx
        i = spec.match(layer, "")
        progs, h2p = spec.head_policy(i, h)
        bq, bk = spec.block_sizes(i)
        plan = AttentionPlan(
            programs=tuple(M.conj(p, M.Causal()) for p in progs),
            head_to_program=h2p,
            num_heads=h,
            num_kv_heads=key.shape[1],
            q_len=sq,
            kv_len=key.shape[2],
            head_dim=d,
            head_dim_v=value.shape[-1],
            dtype="float32",
            scale=scaling,
            block_q=bq,
            block_kv=bk,
        )
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


def test_compiled_llama_equals_reference_with_selected_mask():
    executor = "interpret"
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(1))
    transformers.AttentionInterface.register("attncc_selected_ref", selected_reference_attention(TOPK_SPEC))
    model.config._attn_implementation = "attncc_selected_ref"
    with torch.no_grad():
        want = model(ids).logits
    model.config._attn_implementation = "sdpa"
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
    transformers.AttentionInterface.register("attncc_selected_ref", selected_reference_attention(spec))
    model.config._attn_implementation = "attncc_selected_ref"
    with torch.no_grad():
        want = model(ids).logits
    model.config._attn_implementation = "sdpa"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attncc", options={"spec": spec, "executor": "torch", "inner": "eager"})
    with torch.no_grad():
        got = compiled(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_dense_mask_api_refuses_selectors_with_the_reason():
    spec = load_spec(SPECS / "moba.yaml")
    with pytest.raises((SpecError, M.MaskError, ValueError)):
        attncc.dense_mask(spec, 64, num_heads=2)
