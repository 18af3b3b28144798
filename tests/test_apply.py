"""``attncc.apply(model, spec=...)`` on transformers models, without torch.compile: generate() and
training equal the same model given the pattern as an explicit mask through its own
AttentionInterface (the reference of tests/test_generate.py, written from the spec's definition);
sites no rule covers run exactly as before; ``spec=None`` undoes it."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_generate import PATTERNS, build, reference_attention, spec_of  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

import attncc  # noqa: E402
from attncc.apply import ApplyError  # noqa: E402
from attncc.codegen.executors import observing  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compiler")


def _reference(pattern: str) -> str:
    name = f"attncc_apply_ref_{pattern}"
    transformers.AttentionInterface.register(name, reference_attention(pattern))
    AttentionMaskInterface.register(name, eager_mask)
    return name


def _generate(model, ids, mask=None, cache="dynamic", new=12):
    kw = dict(max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if mask is not None:
        kw["attention_mask"] = mask
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, **kw)


def _prompt(batch=1, n=40):
    ids = torch.randint(1, 64, (batch, n), generator=torch.Generator().manual_seed(1))
    mask = None
    if batch > 1:
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[1, :7] = 0  # left padding
    return ids, mask


def check(arch="llama", pattern="streaming", cache="dynamic", batch=1, impl="sdpa", executor="auto"):
    model = build(arch, impl)
    ids, mask = _prompt(batch)
    model.set_attn_implementation(_reference(pattern))
    want = _generate(model, ids, mask, cache)
    model.set_attn_implementation(impl)
    attncc.apply(model, spec=spec_of(pattern), executor=executor)
    try:
        got = _generate(model, ids, mask, cache)
    finally:
        attncc.apply(model, spec=None)
    assert model.config._attn_implementation == impl
    assert torch.equal(got.sequences, want.sequences)
    err = max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits))
    assert err <= 1e-4, f"max |logits - reference| {err:.3g}"
    return model, ids, mask, got


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_llama_sink_window_generates_the_reference(cache):
    model, ids, mask, got = check(cache=cache)
    # the pattern restricts at these lengths: the model without it decodes other logits, and
    # after apply(spec=None) it is that model again, exactly
    plain = _generate(model, ids, mask, cache)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, plain.logits)) > 1e-3
    fresh = _generate(build("llama", "sdpa"), ids, mask, cache)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, fresh.logits))


@pytest.mark.parametrize("pattern", ["per_head", "layer_group"])
def test_llama_patterns(pattern):
    check(pattern=pattern)


def test_left_padded_batch():
    """Padding comes from the model's own mask function, as a tensor on top of the spec."""
    check(batch=3)


def test_eager_models_and_other_families():
    check(impl="eager")
    for arch in ("qwen2", "gemma3"):
        check(arch=arch)


def test_interpreted_kernels():
    check(executor="interpret")


def test_uncovered_layers_run_as_before():
    """A rule for layer 1 only: layer 0 runs the model's sdpa attention with its own mask."""
    spec = {
        "attncc": 1,
        "block_size": 16,
        "rules": [{"where": {"layers": 1}, "mask": PATTERNS["streaming"][0][0]["mask"]}],
    }

    def pattern(qp, kp, head, layer):
        return PATTERNS["streaming"][1](qp, kp, head, layer) if layer == 1 else kp <= qp

    PATTERNS["layer1_only"] = ([], pattern)
    model = build("llama", "sdpa")
    ids, _ = _prompt()
    model.set_attn_implementation(_reference("layer1_only"))
    want = _generate(model, ids)
    model.set_attn_implementation("sdpa")
    attncc.apply(model, spec=spec)
    got = _generate(model, ids)
    assert torch.equal(got.sequences, want.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits)) <= 1e-4


def test_training_gradients_match_the_reference():
    model = build("llama", "sdpa").train()
    ids, _ = _prompt(batch=2, n=48)

    def grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.set_attn_implementation(_reference("streaming"))
    want_loss, want = grads()
    model.set_attn_implementation("sdpa")
    attncc.apply(model, spec=spec_of("streaming"))
    got_loss, got = grads()
    assert abs(float(got_loss - want_loss)) <= 1e-5
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=name)


def test_torch_compile_of_an_applied_model():
    """The applied model still compiles (plan binding runs outside the graph; the attention is the
    same custom op), with the same logits."""
    model = build("llama", "sdpa")
    ids, _ = _prompt()
    attncc.apply(model, spec=spec_of("streaming"))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_refusals():
    with pytest.raises(ApplyError, match="PreTrainedModel"):
        attncc.apply(torch.nn.Linear(2, 2), spec=spec_of("streaming"))
    model = build("llama", "sdpa").train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    attncc.apply(model, spec=spec_of("streaming"), strict=True)
    with pytest.raises(ApplyError, match="dropout"):
        model(_prompt()[0])
    attncc.apply(model, spec=None)
    model(_prompt()[0])  # back to the model's own attention
    with pytest.raises(attncc.SpecError):
        attncc.apply(model, spec={"attncc": 1, "rules": [{"mask": "nonsense"}]})


# -- diffusers -----------------------------------------------------------------------------------


class ExplicitMask(torch.overrides.TorchFunctionMode):
    """The reference: every SDPA call given the pattern as an explicit bool mask over its
    (joint text + image) token positions, written here from docs/spec.md's window definition."""

    def __init__(self, before: int, after: int):
        super().__init__()
        self.before, self.after = before, after

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            n = q.shape[-2]
            qp, kp = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = (qp - self.before <= kp) & (kp <= qp + self.after)
            assert kwargs.get("attn_mask") is None
            return func(*args, **{**kwargs, "attn_mask": allowed})
        return func(*args, **kwargs)


def flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    g = torch.Generator().manual_seed(2)
    inputs = dict(
        hidden_states=torch.randn(1, 48, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.randn(48, 3, generator=g),
        txt_ids=torch.zeros(8, 3),
    )
    return model, inputs


def test_flux_transformer_equals_explicit_masks():
    model, inputs = flux()
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": {"window": {"before": 5, "after": 7}}}]}
    with torch.no_grad():
        plain = model(**inputs).sample
        with ExplicitMask(5, 7):
            want = model(**inputs).sample
        attncc.apply(model, spec=spec)
        got = model(**inputs).sample
        attncc.apply(model, spec=None)
        again = model(**inputs).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert float((got - plain).abs().max()) > 1e-3  # the window restricts at 56 tokens
    assert torch.equal(again, plain)  # undone: the model's own attention, exactly


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_of_an_applied_flux_transformer(backend):
    """The applied diffusers model compiles into one graph: binding runs once while Dynamo traces
    (the plan key is a constant of the graph), no graph break, no recompile on the next call;
    the output is the applied eager model's and the explicit-mask reference's."""
    from torch._dynamo.utils import counters as dynamo_counters

    model, inputs = flux()
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": {"window": {"before": 5, "after": 7}}}]}
    with torch.no_grad():
        with ExplicitMask(5, 7):
            want = model(**inputs).sample
        attncc.apply(model, spec=spec)
        eager = model(**inputs).sample
        dynamo_counters.clear()
        compiled = torch.compile(model, backend=backend)
        got = compiled(**inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(**inputs).sample
    assert not dynamo_counters["graph_break"], dict(dynamo_counters["graph_break"])
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(again, got)


def test_flux_rule_for_one_block_type_only():
    """``where.module`` selects the double-stream blocks; the single-stream ones run as written."""
    model, inputs = flux()
    spec = {
        "attncc": 1,
        "block_size": 16,
        "rules": [{"where": {"module": "transformer_blocks.*"}, "mask": {"window": {"before": 5, "after": 7}}}],
    }
    with torch.no_grad():
        blocks = model.transformer_blocks[0].attn
        mode = ExplicitMask(5, 7)
        handles = [
            blocks.register_forward_pre_hook(lambda *a: [mode.__enter__(), None][1]),
            blocks.register_forward_hook(lambda *a: mode.__exit__(None, None, None)),
        ]
        want = model(**inputs).sample
        for h in handles:
            h.remove()
        attncc.apply(model, spec=spec)
        got = model(**inputs).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


class ExplicitTextVideo(torch.overrides.TorchFunctionMode):
    """The reference for a joint [text, video] sequence: text tokens attend to and are attended by
    every token; video tokens under a tile3d window on the row-major T x H x W grid (docs/spec.md)."""

    def __init__(self, text, grid, window):
        super().__init__()
        self.text, self.grid, self.window = text, grid, window

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            n = (args[0] if args else kwargs["query"]).shape[-2]
            p = torch.arange(n)
            v = (p - self.text).clamp(min=0)
            _, gh, gw = self.grid
            coords = (v // (gh * gw), (v // gw) % gh, v % gw)
            allowed = (p[:, None] < self.text) | (p[None, :] < self.text)
            inside = torch.ones(n, n, dtype=torch.bool)
            for c, w in zip(coords, self.window):
                inside &= (c[:, None] - c[None, :]).abs() <= w
            return func(*args, **{**kwargs, "attn_mask": allowed | inside})
        return func(*args, **kwargs)


def test_cogvideox_text_plus_tile3d_equals_explicit_masks():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    ).eval()
    g = torch.Generator().manual_seed(3)
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
        timestep=torch.tensor([5]),
    )
    # 8 text tokens, then 3 latent frames of 4 x 4 patches
    mask = {"tile3d": {"grid": [3, 4, 4], "window": [0, 1, 1], "text": {"tokens": 8, "at": "start"}}}
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": mask}]}
    with torch.no_grad():
        with ExplicitTextVideo(8, (3, 4, 4), (0, 1, 1)):
            want = model(**inputs).sample
        attncc.apply(model, spec=spec, strict=True)
        got = model(**inputs).sample
        attncc.apply(model, spec=None)
        plain = model(**inputs).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert float((got - plain).abs().max()) > 1e-3
    # fewer blocks visited than the dense 4 x 4 block grid
    plan = attncc.plan_for(attncc.load_spec(spec), attncc.SiteShape(num_heads=2, q_len=56, head_dim=16))
    assert 0 < int(plan.block_table().visited().sum()) < 16


# -- what attncc.apply must not take: the model's own attention runs, exactly -----------------------

FULL = {"attncc": 1, "block_size": 16, "rules": [{"mask": "full"}]}


def test_soft_capped_gemma2_runs_attncc_with_the_cap():
    cfg = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        head_dim=16,
        sliding_window=24,
        attn_logit_softcapping=2.0,
        query_pre_attn_scalar=16,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)  # scores well beyond the cap
    ids, _ = _prompt()
    caps = []
    with torch.no_grad():
        want = model(ids).logits
        attncc.apply(model, spec=FULL)
        with observing(lambda plan, mask, sel: caps.append(plan.score_mod and plan.score_mod.softcap)):
            got = model(ids).logits
        attncc.apply(model, spec=None)
    # transformers passes softcap= to the attention: attncc compiles the cap into its kernel
    assert caps == [2.0, 2.0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_relative_bias_t5_runs_its_own_attention(impl):
    cfg = transformers.T5Config(
        vocab_size=64, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids, dec = torch.randint(1, 64, (1, 24)), torch.randint(1, 64, (1, 10))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=dec).logits
        attncc.apply(model, spec=FULL)
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.equal(got, want)


def test_requested_attention_weights_come_from_the_model():
    model = build("llama", "eager")
    ids, _ = _prompt(n=20)
    with torch.no_grad():
        want = model(ids, output_attentions=True).attentions
        attncc.apply(model, spec=spec_of("streaming"))
        got = model(ids, output_attentions=True).attentions
    assert len(got) == len(want) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))
