"""Inference over a KV cache: ``generate()`` through ``torch.compile(backend="attncc")`` equals the
same model given the pattern as an explicit mask through its own ``AttentionInterface``, at
prefill, chunked prefill and every decode step, with dynamic and static caches, left-padded
batches and ``dynamic=True``.

The reference is written here, from the spec's definition over absolute positions, and applied
by Hugging Face's own SDPA attention: key j sits at position j (its cache slot); a query sits at
its own key, the last key the model's causal mask lets it see. Nothing of attncc computes it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from support import tiny_llama  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

import attncc  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compiler")

SINK, WINDOW = 4, 32
STREAMING = {"all": ["causal", {"any": [{"sink": SINK}, {"window": WINDOW}]}]}


def streaming(qp, kp, head, layer):
    return (kp <= qp) & ((kp < SINK) | (qp - kp < WINDOW))


def causal(qp, kp, head, layer):
    return kp <= qp


def per_head(qp, kp, head, layer):
    # heads 0 and 2 plain causal, the others streaming
    return torch.where((head == 0) | (head == 2), causal(qp, kp, head, layer), streaming(qp, kp, head, layer))


def layer_group(qp, kp, head, layer):
    # layer 0 keeps the model's mask, the later ones stream
    return causal(qp, kp, head, layer) if layer == 0 else streaming(qp, kp, head, layer)


#: name -> (spec rules, the same pattern written as a predicate of (query position, key position, head, layer))
PATTERNS = {
    "full": ([{"mask": "full"}], lambda qp, kp, head, layer: torch.ones_like(kp <= qp)),
    "streaming": ([{"mask": STREAMING}], streaming),
    "per_head": ([{"mask": STREAMING, "heads": {"0,2": "causal"}}], per_head),
    "layer_group": ([{"where": {"layers": 0}, "mask": "full"}, {"mask": STREAMING}], layer_group),
}


def spec_of(pattern: str) -> dict:
    return {"attncc": 1, "name": pattern, "block_size": 16, "rules": PATTERNS[pattern][0]}


def reference_attention(pattern: str):
    predicate = PATTERNS[pattern][1]

    def attention(module, query, key, value, attention_mask, **kwargs):
        b, h, q_len, _ = query.shape
        kv_len = key.shape[2]
        if attention_mask is None:
            model_ok = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None]
        else:
            model_ok = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        kp = torch.arange(kv_len)
        qp = torch.where(model_ok, kp, -1).amax(-1, keepdim=True)  # [B, 1, q, 1]: a query is at its own key
        head = torch.arange(h).view(1, h, 1, 1)
        allowed = model_ok & predicate(qp, kp, head, module.layer_idx)
        # as Hugging Face's eager mask: a row with no key stays finite (it is a padded query)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return sdpa_attention_forward(module, query, key, value, bias, **kwargs)

    return attention


def build(arch: str, impl: str):
    if arch == "llama":
        return tiny_llama(layers=2, impl=impl)
    common = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=24)
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=24, layer_types=["sliding_attention", "full_attention"]
        )
    else:
        raise ValueError(arch)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def generate(model, ids, impl, mask=None, cache="dynamic", compile_opts=None, new=12):
    kw = dict(max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if mask is not None:
        kw["attention_mask"] = mask
    if cache == "static":
        kw["cache_implementation"] = "static"
    model.config._attn_implementation = impl
    forward = model.forward
    if compile_opts is not None:
        opts = {k: v for k, v in compile_opts.items() if k != "dynamic"}
        model.forward = torch.compile(forward, backend="attncc", options=opts, dynamic=compile_opts.get("dynamic"))
    try:
        with torch.no_grad():
            return model.generate(ids, **kw)
    finally:
        model.forward = forward


def check_generate(arch, pattern, executor="torch", cache="dynamic", impl="sdpa", batch=1, dynamic=None):
    name = f"attncc_ref_{pattern}"
    transformers.AttentionInterface.register(name, reference_attention(pattern))
    AttentionMaskInterface.register(name, eager_mask)
    model = build(arch, impl)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (batch, 40), generator=g)
    mask = None
    if batch > 1:
        # left padding: the second prompt is 7 tokens shorter, the third 15
        mask = torch.ones(batch, 40, dtype=torch.long)
        mask[1, :7] = 0
        mask[2 % batch, :15] = 0
    want = generate(model, ids, name, mask, cache)
    opts = {"spec": spec_of(pattern), "executor": executor, "inner": "eager", "dynamic": dynamic}
    got = generate(model, ids, impl, mask, cache, compile_opts=opts)
    assert torch.equal(got.sequences, want.sequences)
    err = max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits))
    assert err <= 1e-4, f"max |logits - reference| {err:.3g}"
    assert attncc.counters["rewritten"] >= 2 * 2  # both layers, prefill and decode
    assert attncc.counters["unsupported"] == 0 and attncc.counters["skipped"] == 0
    return got


@pytest.mark.parametrize("executor", ["torch", "interpret"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_llama_streaming_every_decode_step(cache, executor):
    got = check_generate("llama", "streaming", executor, cache)
    # the pattern is a real restriction at these lengths: the dense model decodes otherwise
    dense = generate(
        build("llama", "sdpa"), torch.randint(1, 64, (1, 40), generator=torch.Generator().manual_seed(1)), "sdpa"
    )
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, dense.logits)) > 1e-3


@pytest.mark.parametrize("pattern", ["full", "per_head", "layer_group"])
def test_llama_patterns(pattern):
    check_generate("llama", pattern)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_batch_of_three(cache):
    check_generate("llama", "streaming", cache=cache, batch=3)


def test_eager_attention_implementation():
    check_generate("llama", "streaming", impl="eager")


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3"])
def test_other_models(arch):
    check_generate(arch, "streaming")


def test_mistral_static_cache_keeps_its_own_sliding_window():
    check_generate("mistral", "full", cache="static")


def test_dynamic_true_compiles_one_prefill_and_one_decode_graph():
    frames = []
    original = attncc.backend.attncc_backend

    def counting(gm, example_inputs, **kw):
        frames.append(1)
        return original(gm, example_inputs, **kw)

    transformers.AttentionInterface.register("attncc_ref_streaming", reference_attention("streaming"))
    AttentionMaskInterface.register("attncc_ref_streaming", eager_mask)
    model = build("llama", "sdpa")
    ids = torch.randint(1, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    want = generate(model, ids, "attncc_ref_streaming")
    model.config._attn_implementation = "sdpa"
    opts = {"spec": spec_of("streaming"), "executor": "torch", "inner": "eager"}
    forward = model.forward
    model.forward = torch.compile(forward, backend=lambda gm, ex: counting(gm, ex, options=opts), dynamic=True)
    try:
        with torch.no_grad():
            got = model.generate(
                ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        model.forward = forward
    assert torch.equal(got.sequences, want.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits)) <= 1e-4
    assert len(frames) == 2, f"{len(frames)} graphs compiled: one prefill and one decode graph expected"


@pytest.mark.parametrize("pattern", ["full", "streaming"])
def test_chunked_prefill(pattern):
    """48 tokens, then three chunks of 8 over the cache: each chunk's logits equal the reference."""
    name = f"attncc_ref_{pattern}"
    transformers.AttentionInterface.register(name, reference_attention(pattern))
    AttentionMaskInterface.register(name, eager_mask)
    model = build("llama", "sdpa")
    ids = torch.randint(1, 64, (1, 72), generator=torch.Generator().manual_seed(2))

    def chunks(forward):
        cache = transformers.DynamicCache(config=model.config)
        outs = []
        with torch.no_grad():
            for lo, hi in ((0, 48), (48, 56), (56, 64), (64, 72)):
                outs.append(forward(input_ids=ids[:, lo:hi], past_key_values=cache, use_cache=True).logits)
        return outs

    model.config._attn_implementation = name
    want = chunks(model.forward)
    model.config._attn_implementation = "sdpa"
    compiled = torch.compile(
        model.forward, backend="attncc", options={"spec": spec_of(pattern), "executor": "torch", "inner": "eager"}
    )
    got = chunks(compiled)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, i=i: f"chunk {i}: {m}")


def bart():
    cfg = transformers.BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="sdpa").eval()


CROSS = {"attncc": 1, "block_size": 16, "rules": [{"where": {"module": "*encoder_attn"}, "mask": STREAMING}]}


def test_cross_attention_has_no_query_positions_and_is_left_as_written():
    model = bart()
    inp = {"input_ids": torch.randint(3, 100, (1, 40)), "decoder_input_ids": torch.randint(3, 100, (1, 9))}
    with torch.no_grad():
        want = model(**inp).logits
        got = torch.compile(model, backend="attncc", options={"spec": CROSS, "inner": "eager"})(**inp).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert attncc.counters["rewritten"] == 0 and attncc.counters["unsupported"] == 1


def test_cross_attention_position_rule_is_an_error_under_strict():
    model = bart()
    inp = {"input_ids": torch.randint(3, 100, (1, 40)), "decoder_input_ids": torch.randint(3, 100, (1, 9))}
    spec = {**CROSS, "rules": [*CROSS["rules"], {"mask": "full"}]}
    compiled = torch.compile(model, backend="attncc", options={"spec": spec, "inner": "eager", "strict": True})
    with pytest.raises(Exception, match="reads query positions, but the positions of this site's 9 queries"):
        with torch.no_grad():
            compiled(**inp)


def test_cross_attention_takes_masks_that_do_not_read_query_positions():
    model = bart()
    inp = {"input_ids": torch.randint(3, 100, (1, 40)), "decoder_input_ids": torch.randint(3, 100, (1, 9))}
    spec = {"attncc": 1, "block_size": 16, "rules": [{"where": {"module": "*encoder_attn"}, "mask": {"sink": 8}}]}
    with torch.no_grad():
        compiled = torch.compile(model, backend="attncc", options={"spec": spec, "inner": "eager"})
        got = compiled(**inp).logits
    assert attncc.counters["rewritten"] == 1

    # the reference: the decoder's cross-attention (9 queries over 40 keys) sees the first 8 keys only
    def sink_attention(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == key.shape[2]:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        allowed = (torch.arange(key.shape[2]) < 8).view(1, 1, 1, -1).expand(1, 1, query.shape[2], -1)
        if attention_mask is not None:
            allowed = allowed & (attention_mask > torch.finfo(attention_mask.dtype).min / 2)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return sdpa_attention_forward(module, query, key, value, bias, **kwargs)

    transformers.AttentionInterface.register("attncc_ref_cross_sink", sink_attention)
    AttentionMaskInterface.register("attncc_ref_cross_sink", eager_mask)
    model.config._attn_implementation = "attncc_ref_cross_sink"
    with torch.no_grad():
        want = model(**inp).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
