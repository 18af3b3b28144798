"""Data-dependent selection inside ``generate()``: top-k blocks selected at prefill and at every
decode step (one query block), reused across layers (DELTA, TidalDecode) and across decode steps
(Recycled Attention), against the same Hugging Face model whose attention applies the selection
rule written here from docs/dynamic.md (mean-pooled block scores, candidates, top-k, reuse), as an
explicit mask through its own ``AttentionInterface``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from support import tiny_llama  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

import attncc  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compiler")

SINK, WINDOW, K, BLOCK = 4, 16, 2, 16
SELECT = {"all": ["causal", {"any": [{"sink": SINK}, {"window": WINDOW}, {"topk": {"k": K}}]}]}


def static_part(qp, kp):
    return (kp < SINK) | (qp - kp < WINDOW)


def block_means(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, D]``: the mean of each ``BLOCK``-token block of ``x [B, H, S, D]`` over its tokens."""
    b, h, s, d = x.shape
    n = -(-s // BLOCK)
    pad = torch.zeros(b, h, n * BLOCK, d)
    pad[:, :, :s] = x.float()
    counts = torch.clamp(s - torch.arange(n) * BLOCK, max=BLOCK).float()
    return pad.view(b, h, n, BLOCK, d).sum(3) / counts.view(1, 1, -1, 1)


def select_blocks(q, k, qp: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, H, nq, nk]`` bool: per query block of the call, the ``K`` candidate kv blocks with the
    highest mean-pooled score (lower index first on ties); a candidate is a block where some
    causal pair is not kept by the sink or the window."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    g = h // k.shape[1]
    nq, nk = -(-sq // BLOCK), -(-skv // BLOCK)
    kp = torch.arange(skv)
    qpos = qp.view(-1)  # [Sq] absolute positions of the call's queries
    extra = (kp.view(1, -1) <= qpos.view(-1, 1)) & ~static_part(qpos.view(-1, 1), kp.view(1, -1))  # [Sq, Skv]
    pad = torch.zeros(nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    pad[:sq, :skv] = extra
    cand = pad.view(nq, BLOCK, nk, BLOCK).any(3).any(1)  # [nq, nk]
    logits = scale * block_means(q) @ block_means(k).repeat_interleave(g, 1).transpose(-1, -2)
    logits = torch.where(cand, logits.double(), float("-inf"))
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nk).expand_as(order))
    return cand & (rank < K)


class Reference:
    """The pattern applied to each layer's attention: the selection rule, reused per ``plan``."""

    def __init__(self, producers: set[int], refresh_every: int | None = None):
        self.producers, self.refresh_every = producers, refresh_every
        self.selected: torch.Tensor | None = None  # the last producing layer's selection
        self.calls: dict[int, int] = {}
        self.stored: dict[int, torch.Tensor] = {}

    def selection(self, layer, q, k, qp, scale):
        if self.refresh_every is not None:
            # call reuse: computed every `refresh_every` calls, else the stored one, with kv blocks
            # that did not exist then (the cache grew) not selected; a stored selection of another
            # query-block count (prefill -> decode) is computed afresh
            c = self.calls.get(layer, 0)
            self.calls[layer] = c + 1
            old = self.stored.get(layer)
            nq, nk = -(-q.shape[2] // BLOCK), -(-k.shape[2] // BLOCK)
            if c % self.refresh_every == 0 or old is None or old.shape[2] != nq:
                self.stored[layer] = select_blocks(q, k, qp, scale)
            elif old.shape[3] < nk:
                self.stored[layer] = torch.nn.functional.pad(old, (0, nk - old.shape[3]))
            return self.stored[layer]
        if layer in self.producers:
            self.selected = select_blocks(q, k, qp, scale)
        return self.selected

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        b, h, sq, _ = query.shape
        skv = key.shape[2]
        model_ok = attention_mask > torch.finfo(attention_mask.dtype).min / 2  # [B, 1, Sq, Skv]
        kp = torch.arange(skv)
        qp = torch.where(model_ok, kp, -1).amax(-1, keepdim=True)  # a query is at its own key
        scale = kwargs.get("scaling") or module.scaling
        selected = self.selection(module.layer_idx, query, key, qp[0, 0], scale)  # [B, H, nq, nk]
        chosen = selected.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)[:, :, :sq, :skv]
        allowed = model_ok & (kp <= qp) & (static_part(qp, kp) | chosen)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return sdpa_attention_forward(module, query, key, value, bias, **kwargs)


def generate(model, ids, impl, compile_opts=None, new=10):
    model.config._attn_implementation = impl
    forward = model.forward
    if compile_opts is not None:
        model.forward = torch.compile(forward, backend="attncc", options=compile_opts)
    try:
        with torch.no_grad():
            return model.generate(
                ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        model.forward = forward


def check(spec_rules, reference: Reference, executor: str, layers: int = 4):
    name = f"attncc_sel_{id(reference)}"
    transformers.AttentionInterface.register(name, reference)
    AttentionMaskInterface.register(name, eager_mask)
    model = tiny_llama(layers=layers)
    ids = torch.randint(1, 64, (1, 100), generator=torch.Generator().manual_seed(3))
    want = generate(model, ids, name)
    spec = {"attncc": 1, "block_size": BLOCK, "rules": spec_rules}
    got = generate(model, ids, "sdpa", {"spec": spec, "executor": executor, "inner": "eager", "strict": True})
    assert torch.equal(got.sequences, want.sequences)
    err = max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits))
    assert err <= 1e-4, f"max |logits - reference| {err:.3g}"
    assert attncc.counters["rewritten"] >= 2 * layers and attncc.counters["skipped"] == 0
    return got


@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_topk_selects_at_every_decode_step(executor):
    check([{"mask": SELECT}], Reference(producers={0, 1, 2, 3}), executor)


@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_layer_reuse_delta(executor):
    """Layers 0-1 select, layers 2-3 take layer 1's selection, at prefill and every decode step."""
    rules = [
        {"name": "select", "where": {"layers": "0-1"}, "mask": SELECT},
        {"name": "reuse", "where": {"layers": "2-"}, "mask": SELECT, "reuse": {"from": "select"}},
    ]
    check(rules, Reference(producers={0, 1}), executor)


def test_call_reuse_across_decode_steps_recycled():
    """Selections computed at the prefill and every 4th decode step, reused in between while the
    cache grows past a block boundary (the new blocks are not selected: the window covers them)."""
    cache = attncc.SelectionCache()
    rules = [{"mask": SELECT, "reuse": {"refresh_every": 4}}]
    ref = Reference(producers=set(), refresh_every=4)
    name = "attncc_sel_recycled"
    transformers.AttentionInterface.register(name, ref)
    AttentionMaskInterface.register(name, eager_mask)
    model = tiny_llama(layers=2)
    # keys 110 at the prefill, 113 (a new 16-token block) at the third decode step, between refreshes
    ids = torch.randint(1, 64, (1, 110), generator=torch.Generator().manual_seed(3))
    want = generate(model, ids, name, new=12)
    spec = {"attncc": 1, "block_size": BLOCK, "rules": rules}
    opts = {"spec": spec, "executor": "torch", "inner": "eager", "strict": True, "selection_cache": cache}
    got = generate(model, ids, "sdpa", opts, new=12)
    assert torch.equal(got.sequences, want.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits)) <= 1e-4
    # 12 calls per site (prefill + 11 decode steps): prefill computes, the first decode step
    # computes afresh (one query block now), then refreshes at calls 4 and 8
    assert sorted(cache.state().values()) == [(12, 4), (12, 4)]


@pytest.mark.parametrize("name", ["recycled", "tidaldecode"])
def test_ready_decode_specs_run_inside_generate(name):
    """The decode-time specs under specs/dynamic/ bind every site of a 16-layer Llama (strict),
    generate, and are not the dense model."""
    model = tiny_llama(layers=16, max_position_embeddings=2048)
    # longer than what sinks, window and the k selected blocks cover together
    ids = torch.randint(1, 64, (1, 1500), generator=torch.Generator().manual_seed(4))
    dense = generate(model, ids, "sdpa", new=4)
    opts = {"spec": f"specs/dynamic/{name}.yaml", "executor": "torch", "inner": "eager", "strict": True}
    if name == "recycled":
        opts["selection_cache"] = attncc.SelectionCache()
    got = generate(model, ids, "sdpa", opts, new=4)
    assert attncc.counters["rewritten"] >= 2 * 16 and attncc.counters["rewritten"] % 16 == 0
    assert attncc.counters["skipped"] == 0 and attncc.counters["unsupported"] == 0
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, dense.logits)) > 1e-4
