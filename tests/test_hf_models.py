"""Tiny random-weight transformers models: every attention detected and rewritten, outputs equal."""

from __future__ import annotations

import json

import pytest
import torch

import attncc
from attncc.counters import counters

T = pytest.importorskip("transformers")

LLAMA_LIKE = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def build(arch: str, impl: str):
    """(model, inputs, output getter, expected sites as (module suffix, layer, heads, kv heads, q_len, kv_len))."""
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 16))
    lm = {"input_ids": ids, "use_cache": False}
    if arch in ("llama", "qwen2", "mistral"):
        kw = dict(LLAMA_LIKE, sliding_window=8) if arch == "mistral" else LLAMA_LIKE
        model = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(arch, **kw), attn_implementation=impl)
        sites = [("self_attn", i, 4, 2, 16, 16) for i in range(2)]
        return model, lm, lambda o: o.logits, sites
    if arch == "gemma3":
        cfg = T.Gemma3TextConfig(
            **LLAMA_LIKE, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        )
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        return model, lm, lambda o: o.logits, [("self_attn", i, 4, 2, 16, 16) for i in range(2)]
    if arch == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        return model, lm, lambda o: o.logits, [("attn", i, 4, 4, 16, 16) for i in range(2)]
    if arch == "bert":
        cfg = T.BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        )
        model = T.AutoModel.from_config(cfg, attn_implementation=impl)
        pad = torch.ones(2, 16, dtype=torch.long)
        pad[1, 11:] = 0
        inp = {"input_ids": ids, "attention_mask": pad}
        return model, inp, lambda o: o.last_hidden_state, [("attention.self", i, 4, 4, 16, 16) for i in range(2)]
    if arch == "vit":
        cfg = T.ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        )
        model = T.AutoModel.from_config(cfg, attn_implementation=impl)
        inp = {"pixel_values": torch.randn(2, 3, 32, 32)}
        return model, inp, lambda o: o.last_hidden_state, [("attention", i, 4, 4, 17, 17) for i in range(2)]
    if arch == "bart":
        cfg = T.BartConfig(
            vocab_size=100,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=64,
        )
        model = T.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=impl)
        inp = {"input_ids": ids, "decoder_input_ids": ids[:, :8], "use_cache": False}
        sites = [
            ("encoder.layers.0.self_attn", 0, 4, 4, 16, 16),
            ("encoder.layers.1.self_attn", 1, 4, 4, 16, 16),
            ("decoder.layers.0.self_attn", 0, 4, 4, 8, 8),
            ("decoder.layers.0.encoder_attn", 0, 4, 4, 8, 16),
            ("decoder.layers.1.self_attn", 1, 4, 4, 8, 8),
            ("decoder.layers.1.encoder_attn", 1, 4, 4, 8, 16),
        ]
        return model, inp, lambda o: o.logits, sites
    raise AssertionError(arch)


CASES = [
    (a, i) for a in ("llama", "qwen2", "mistral", "gemma3", "gpt2", "bert", "vit", "bart") for i in ("eager", "sdpa")
]
# the model's own mask each architecture's first site must be recovered as (structural, runtime kind)
OWN_MASK = {
    "llama": ("causal", None),
    "qwen2": ("causal", None),
    "mistral": ("{window: 8}", None),
    "gemma3": ("{window: 8}", None),
    "gpt2": ("causal", None),
    "vit": ("full", None),
    "bart": ("full", None),
}


@pytest.mark.parametrize("arch,impl", CASES)
def test_every_attention_rewritten_and_equal(arch, impl, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    model, inp, get, expected = build(arch, impl)
    model.eval()
    with torch.no_grad():
        ref = get(model(**inp))
        compiled = torch.compile(
            model,
            backend="attncc",
            fullgraph=True,
            options={"inner": "eager", "executor": "reference", "dump_dir": str(tmp_path)},
        )
        out = get(compiled(**inp))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counters["detected"] == counters["rewritten"] == len(expected)
    (folder,) = tmp_path.iterdir()
    sites = json.loads((folder / "manifest.json").read_text())["sites"]
    got = [(s["module"], s["layer"], s["num_heads"], s["num_kv_heads"], s["q_len"], s["kv_len"]) for s in sites]
    for (mod, layer, h, hkv, sq, skv), g in zip(expected, got):
        assert g[0].endswith(mod) and g[1:] == (layer, h, hkv, sq, skv), got
    if arch in OWN_MASK:
        assert (sites[0]["model_mask"], sites[0]["runtime_mask"]) == OWN_MASK[arch]
    if arch == "gemma3":
        assert sites[1]["model_mask"] == "causal"
    if arch == "bert":
        assert sites[0]["runtime_mask"] is not None


SPEC = {
    "attncc": 1,
    "rules": [
        {"name": "stream", "mask": {"any": [{"sink": 2}, {"window": 4}]}, "heads": {"0": "causal", "3": {"window": 2}}}
    ],
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_spec_equals_explicit_4d_mask(impl):
    torch._dynamo.reset()
    model, inp, get, _ = build("llama", impl)
    model.eval()
    allowed = attncc.dense_mask(SPEC, 16, num_heads=4) & torch.ones(16, 16, dtype=torch.bool).tril()
    additive = torch.zeros(1, 4, 16, 16).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = get(model(**inp, attention_mask=additive.expand(2, -1, -1, -1)))
        compiled = torch.compile(
            model, backend="attncc", fullgraph=True, options={"inner": "eager", "executor": "reference", "spec": SPEC}
        )
        out = get(compiled(**inp))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
