"""Tiny random-weight transformers and diffusers models: every attention detected and rewritten,
outputs equal to the uncompiled model (``mask: full``) or to the same model run with explicit
masks built from ``attncc.dense_mask`` (spec masks, layer groups, tile3d on a video DiT)."""

from __future__ import annotations

import json

import pytest
import torch

import attncc
from attncc.config import config
from attncc.counters import counters

T = pytest.importorskip("transformers")

# hidden 32 = 4 heads of dim 8 over 2 kv heads: big enough for GQA and head policies, small enough
# that Dynamo's trace dominates the cost
LLAMA_LIKE = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
SEQ = 12
WINDOW = 4
OPTS = {"inner": "eager", "executor": "reference"}


@pytest.fixture(autouse=True, scope="module")
def _no_aot_or_mlir_in_dumps():
    # the dump's ahead-of-time GPU compiles and MLIR export have their own tests (test_backend)
    with config.scope(dump_aot=False, dump_mlir=False):
        yield


def build(arch: str, impl: str, layers: int = 2):
    """(model, inputs, output getter, expected sites as (module suffix, layer, heads, kv heads, q_len, kv_len))."""
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, SEQ))
    lm = {"input_ids": ids, "use_cache": False}
    if arch in ("llama", "qwen2", "mistral"):
        kw = dict(LLAMA_LIKE, num_hidden_layers=layers)
        if arch == "mistral":
            kw["sliding_window"] = WINDOW
        model = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(arch, **kw), attn_implementation=impl)
        sites = [("self_attn", i, 4, 2, SEQ, SEQ) for i in range(layers)]
        return model, lm, lambda o: o.logits, sites
    if arch == "gemma3":
        cfg = T.Gemma3TextConfig(
            **LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]
        )
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        return model, lm, lambda o: o.logits, [("self_attn", i, 4, 2, SEQ, SEQ) for i in range(2)]
    if arch == "gemma2":
        # soft-capped scores (tanh(s / 2) * 2 before the mask), queries scaled so the cap bites
        cfg = T.Gemma2Config(**LLAMA_LIKE, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=2.0)
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(20)
        return model, lm, lambda o: o.logits, [("self_attn", i, 4, 2, SEQ, SEQ) for i in range(2)]
    if arch == "mpt":
        # ALiBi: a bias computed from positions only, recovered as per-head slopes
        cfg = T.MptConfig(vocab_size=100, d_model=32, n_heads=4, n_layers=2, max_seq_len=32, expansion_ratio=2)
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        return model, lm, lambda o: o.logits, [("attn", i, 4, 4, SEQ, SEQ) for i in range(2)]
    if arch == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        return model, lm, lambda o: o.logits, [("attn", i, 4, 4, SEQ, SEQ) for i in range(2)]
    if arch == "bert":
        cfg = T.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
        model = T.AutoModel.from_config(cfg, attn_implementation=impl)
        pad = torch.ones(2, SEQ, dtype=torch.long)
        pad[1, 9:] = 0
        inp = {"input_ids": ids, "attention_mask": pad}
        return model, inp, lambda o: o.last_hidden_state, [("attention.self", i, 4, 4, SEQ, SEQ) for i in range(2)]
    if arch == "vit":
        cfg = T.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        )
        model = T.AutoModel.from_config(cfg, attn_implementation=impl)
        inp = {"pixel_values": torch.randn(2, 3, 16, 16)}
        return model, inp, lambda o: o.last_hidden_state, [("attention", i, 4, 4, 17, 17) for i in range(2)]
    if arch == "bart":
        cfg = T.BartConfig(
            vocab_size=100,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=32,
        )
        model = T.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=impl)
        inp = {"input_ids": ids, "decoder_input_ids": ids[:, :7], "use_cache": False}
        sites = [
            ("encoder.layers.0.self_attn", 0, 4, 4, SEQ, SEQ),
            ("encoder.layers.1.self_attn", 1, 4, 4, SEQ, SEQ),
            ("decoder.layers.0.self_attn", 0, 4, 4, 7, 7),
            ("decoder.layers.0.encoder_attn", 0, 4, 4, 7, SEQ),
            ("decoder.layers.1.self_attn", 1, 4, 4, 7, 7),
            ("decoder.layers.1.encoder_attn", 1, 4, 4, 7, SEQ),
        ]
        return model, inp, lambda o: o.logits, sites
    raise AssertionError(arch)


CASES = [
    (a, i) for a in ("llama", "qwen2", "mistral", "gemma3", "gpt2", "bert", "vit", "bart") for i in ("eager", "sdpa")
] + [("gemma2", "eager"), ("mpt", "eager")]  # the only implementation transformers runs them with
# the model's own mask each architecture's first site must be recovered as (structural, runtime kind)
OWN_MASK = {
    "llama": ("causal", None),
    "qwen2": ("causal", None),
    "mistral": (f"{{window: {WINDOW}}}", None),
    "gemma3": (f"{{window: {WINDOW}}}", None),
    "gemma2": (f"{{window: {WINDOW}}}", None),
    "mpt": ("causal", None),
    "gpt2": ("causal", None),
    "vit": ("full", None),
    "bart": ("full", None),
}


def _sites(dump) -> list[dict]:
    (folder,) = dump.iterdir()
    return json.loads((folder / "manifest.json").read_text())["sites"]


@pytest.mark.parametrize("arch,impl", CASES)
def test_every_attention_rewritten_and_equal(arch, impl, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    model, inp, get, expected = build(arch, impl)
    model.eval()
    with torch.no_grad():
        ref = get(model(**inp))
        compiled = torch.compile(model, backend="attncc", fullgraph=True, options={**OPTS, "dump_dir": str(tmp_path)})
        out = get(compiled(**inp))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counters["detected"] == counters["rewritten"] == len(expected)
    sites = _sites(tmp_path)
    got = [(s["module"], s["layer"], s["num_heads"], s["num_kv_heads"], s["q_len"], s["kv_len"]) for s in sites]
    assert len(got) == len(expected)
    for (mod, layer, h, hkv, sq, skv), g in zip(expected, got):
        assert g[0].endswith(mod) and g[1:] == (layer, h, hkv, sq, skv), got
    if arch in OWN_MASK:
        assert (sites[0]["model_mask"], sites[0]["runtime_mask"]) == OWN_MASK[arch]
    if arch in ("gemma3", "gemma2"):
        assert sites[1]["model_mask"] == "causal"
    if arch == "gemma2":
        # the cap is compiled into the kernel: taking it away changes the logits
        assert "softcap" in sites[0]["kernel"], sites[0]
    if arch == "mpt":
        # the bias is structure in the kernel, not a run-time tensor
        assert "alibi" in sites[0]["kernel"], sites[0]
    if arch == "bert":
        assert sites[0]["runtime_mask"] is not None


def test_mpt_alibi_is_structure_so_a_window_skips_blocks():
    """ALiBi read as slopes, not an S x S tensor: a window spec leaves pairs and blocks out
    (density of the window, < 1) in an ALiBi kernel (exactness: the parametrized test above)."""
    model, inp, get, _ = build("mpt", "eager")
    model.eval()
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": {"window": 4}}]}
    report = attncc.explain(model, **inp, spec=spec)
    assert [round(s.density[0], 4) for s in report.sites] == [round((4 * SEQ - 6) / SEQ**2, 4)] * 2
    assert all(s.kernel.endswith("alibi_fwd_kernel") for s in report.sites)


# layer groups: 0-1 keep the model's causal mask, 2 a window, 3 sink + window with two head overrides
LAYER_GROUPS = {
    "attncc": 1,
    "block_size": 16,
    "rules": [
        {"name": "dense", "where": {"layers": "0-1"}, "mask": "full"},
        {"name": "local", "where": {"layers": "2"}, "mask": {"window": 3}},
        {
            "name": "stream",
            "where": {"layers": "3"},
            "mask": {"any": [{"sink": 2}, {"window": 3}]},
            "heads": {"0": "causal", "3": {"window": 2}},
        },
    ],
}


def _explicit_mask_reference(model, inp, spec):
    """The uncompiled model with each layer's attention given the 4-D mask dense_mask(spec) & causal,
    through transformers' sdpa attention (swapped in via ALL_ATTENTION_FUNCTIONS, eager models too)."""
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    heads = model.config.num_attention_heads
    masks = [
        attncc.dense_mask(spec, SEQ, num_heads=heads, layer=i, module=f"model.layers.{i}.self_attn") & causal
        for i in range(model.config.num_hidden_layers)
    ]
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def with_layer_mask(module, query, key, value, attention_mask, **kw):
        kw.pop("is_causal", None)
        mask = masks[module.layer_idx].unsqueeze(0)
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kw)

    impl = model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS["sdpa"] = with_layer_mask
    model.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():
            return model(**inp).logits, masks
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
        model.config._attn_implementation = impl


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_layer_groups_equal_explicit_per_layer_masks(impl, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    model, inp, get, _ = build("llama", impl, layers=4)
    model.eval()
    ref, masks = _explicit_mask_reference(model, inp, LAYER_GROUPS)
    # the groups differ from each other and layer 3's heads differ: the test would see a mix-up
    assert not torch.equal(masks[1], masks[2]) and not torch.equal(masks[2], masks[3])
    assert not torch.equal(masks[3][0], masks[3][1]) and not torch.equal(masks[3][3], masks[3][1])
    with torch.no_grad():
        compiled = torch.compile(
            model,
            backend="attncc",
            fullgraph=True,
            options={**OPTS, "executor": "torch", "spec": LAYER_GROUPS, "dump_dir": str(tmp_path)},
        )
        out = get(compiled(**inp))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counters["rewritten"] == 4
    assert [(s["layer"], s["rule"]) for s in _sites(tmp_path)] == [
        (0, "dense"),
        (1, "dense"),
        (2, "local"),
        (3, "stream"),
    ]


# -- diffusers: a video DiT whose self-attention sequence is the latent patch grid ----------------
# Wan: latents [B, C, F, H, W], patches (1, 2, 2) -> a 3 x 4 x 4 token grid in raster order (frame,
# row, column); attn1 is self-attention over exactly those tokens, attn2 is cross-attention to text.
GRID = (3, 4, 4)
WAN_SPEC = {
    "attncc": 1,
    "block_size": 16,
    "rules": [
        {
            "name": "video-local",
            "where": {"module": "*.attn1", "layers": "0"},
            "mask": {"tile3d": {"grid": list(GRID), "window": [1, 1, 1]}},
            "permute": {"grid": list(GRID), "tile": [1, 2, 2]},
        },
        {
            "name": "video-wide",
            "where": {"module": "*.attn1"},
            "mask": {"tile3d": {"grid": list(GRID), "window": [0, 2, 2]}},
            "heads": {"1": {"tile3d": {"grid": list(GRID), "window": [2, 1, 1]}}},
        },
        {"name": "text", "where": {"module": "*.attn2"}, "mask": "full"},
    ],
}


class _WithMask:
    """Wan attention processor that hands ``mask`` [1, H, S, S] to the attention it dispatches."""

    def __init__(self, inner, mask: torch.Tensor):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb, **kw)


def test_wan_video_dit_tile3d_equals_explicit_masks(tmp_path):
    D = pytest.importorskip("diffusers")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    heads = 2
    model = D.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    ).eval()
    latents = torch.randn(1, 4, GRID[0], 2 * GRID[1], 2 * GRID[2])
    args = (latents, torch.tensor([10]), torch.randn(1, 5, 16))
    seq = GRID[0] * GRID[1] * GRID[2]

    masks = [attncc.dense_mask(WAN_SPEC, seq, num_heads=heads, layer=i, module=f"blocks.{i}.attn1") for i in range(2)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1][0], masks[1][1])
    assert all(0.1 < m.float().mean() < 0.9 for m in masks)
    originals = [b.attn1.processor for b in model.blocks]
    for block, mask in zip(model.blocks, masks):
        block.attn1.processor = _WithMask(block.attn1.processor, mask.unsqueeze(0))
    try:
        with torch.no_grad():
            ref = model(*args, return_dict=False)[0]
    finally:
        for block, proc in zip(model.blocks, originals):
            block.attn1.processor = proc
    with torch.no_grad():
        unmasked = model(*args, return_dict=False)[0]
        compiled = torch.compile(
            model,
            backend="attncc",
            fullgraph=True,
            options={**OPTS, "executor": "torch", "spec": WAN_SPEC, "dump_dir": str(tmp_path)},
        )
        out = compiled(*args, return_dict=False)[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the masks matter: the unmasked model gives another result
    assert (unmasked - ref).abs().max() > 1e-3
    assert counters["detected"] == counters["rewritten"] == 4
    sites = _sites(tmp_path)
    assert [(s["module"], s["layer"], s["rule"], s["q_len"], s["kv_len"]) for s in sites] == [
        ("blocks.0.attn1", 0, "video-local", seq, seq),
        ("blocks.0.attn2", 0, "text", seq, 5),
        ("blocks.1.attn1", 1, "video-wide", seq, seq),
        ("blocks.1.attn2", 1, "text", seq, 5),
    ]
    assert sites[0]["plan"]["permute"] is not None and sites[0]["layout"] == sites[2]["layout"]
