"""Spellings of attention scores that real models write: in-place arithmetic on the scores
(``scores /= sqrt(d)``, ``scores.masked_fill_(m, v)`` as a statement), ``baddbmm`` (Bloom's fused
bias + QK^T); and every softmax(.) @ V that is not taken is reported with its reason. Each compiled
model is checked against the uncompiled one, and against an explicit mask where a rule restricts."""

from __future__ import annotations

import math

import pytest
import torch

import attncc

pytestmark = pytest.mark.usefixtures("fresh_compiler")

WINDOW = {"attncc": 1, "block_size": 16, "rules": [{"mask": {"window": {"before": 6, "after": 0}}}]}
FULL = {"attncc": 1, "block_size": 16, "rules": [{"mask": "full"}]}


def compiled_matches(model, *inputs, strict: bool = True):
    """``model`` compiled by attncc (FULL spec) on ``inputs``: asserts it equals the uncompiled
    model (fp32, atol 1e-5) and returns the compiled output."""
    want = model(*inputs)
    got = torch.compile(model, backend="attncc", options={"spec": FULL, "strict": strict})(*inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return got


class Scores(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, pad):
        s = q @ k.transpose(-1, -2)
        d = q.shape[-1]
        if self.how == "itruediv":
            s /= math.sqrt(d)
        elif self.how == "imul":
            s *= d**-0.5
        elif self.how == "masked_fill_statement":
            s.masked_fill_(pad, float("-inf"))  # the result unused: `s` is read after the mutation
            s = s / math.sqrt(d)
        elif self.how == "add_statement":
            s.add_(pad.float() * -1e9)
            s = s * d**-0.5
        elif self.how == "alias_read_before":
            before = s.sum()  # read before the mutation: the old value
            s /= math.sqrt(d)
            return s.softmax(-1) @ v + before
        elif self.how == "view_mutation":
            s[..., :4] += 1.0  # through a view: stays as written
            s = s / math.sqrt(d)
        elif self.how == "baddbmm":
            b, h, n, _ = q.shape
            bias = torch.arange(n, dtype=q.dtype).expand(b * h, n, n) * -0.1  # an ALiBi-like bias
            s = torch.baddbmm(bias, q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2), alpha=d**-0.5)
            s = s.view(b, h, n, n)
        return s.softmax(-1) @ v


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    pad = torch.zeros(32, 32, dtype=torch.bool)
    pad[:, 27:] = True
    return q, k, v, pad


@pytest.mark.parametrize(
    "how,rewritten",
    [
        ("itruediv", 1),
        ("imul", 1),
        ("masked_fill_statement", 1),
        ("add_statement", 1),
        # the product is also read elsewhere: exact out of place, then left as written by detection
        ("alias_read_before", 0),
        ("view_mutation", 0),
    ],
)
def test_in_place_score_arithmetic(how, rewritten):
    q, k, v, pad = _inputs()
    model = Scores(how)
    want = model(q.clone(), k.clone(), v.clone(), pad)
    got = torch.compile(model, backend="attncc", options={"spec": FULL, "strict": rewritten == 1})(q, k, v, pad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert attncc.counters["rewritten"] == rewritten
    if not rewritten:
        assert attncc.counters["skipped"] == 1  # reported, not silent


def test_in_place_division_under_a_window_equals_the_explicit_mask():
    q, k, v, pad = _inputs()
    got = torch.compile(Scores("itruediv"), backend="attncc", options={"spec": WINDOW, "strict": True})(q, k, v, pad)
    qp, kp = torch.arange(32)[:, None], torch.arange(32)[None, :]
    allowed = (qp - 6 <= kp) & (kp <= qp)  # docs/spec.md window before/after
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    want = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_baddbmm_is_product_scale_and_bias():
    """Bloom's spelling reaches detection as product, scale and an additive bias; this graph then
    reshapes the scores from [B*H] to [B, H], which normalize moves onto the operands: rewritten."""
    q, k, v, pad = _inputs()
    model = Scores("baddbmm")
    want = model(q, k, v, pad)
    report = attncc.explain(model, q, k, v, pad, spec=FULL)
    assert len(report.sites) == 1 and not report.skipped
    got = torch.compile(model, backend="attncc", options={"spec": FULL, "strict": True})(q, k, v, pad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_baddbmm_without_reshape_is_rewritten():
    class Merged(torch.nn.Module):
        def forward(self, q, k, v):  # [B*H, S, D] operands, as Bloom's bmm path
            bias = torch.arange(q.shape[1], dtype=q.dtype).expand(q.shape[0], q.shape[1], q.shape[1]) * -0.1
            s = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=0.25)
            return torch.bmm(s.softmax(-1), v)

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 32, 16, generator=g) for _ in range(3))
    compiled_matches(Merged(), q, k, v)
    assert attncc.counters["rewritten"] == 1


class Capped(torch.nn.Module):
    """Soft-capped scores spelled as Gemma 2 does (scale, / cap, tanh, * cap, + mask)."""

    def __init__(self, pre=0.25, cap=3.0, post=None, mask_inside=False):
        super().__init__()
        self.pre, self.cap, self.post, self.mask_inside = pre, cap, cap if post is None else post, mask_inside

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) * self.pre
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if self.mask_inside:
            s = s.masked_fill(~causal, float("-inf"))
        s = torch.tanh(s / self.cap) * self.post
        if not self.mask_inside:
            s = s.masked_fill(~causal, float("-inf"))
        return s.softmax(-1) @ v


def test_soft_capped_scores_are_compiled_with_the_cap():
    q, k, v, _ = _inputs()
    q = q * 4  # scores beyond the cap
    model = Capped()
    compiled_matches(model, q, k, v)
    assert attncc.counters["rewritten"] == 1
    (site,) = attncc.explain(model, q, k, v, spec=FULL).sites
    assert site.kernel.endswith("softcap_fwd_kernel")


@pytest.mark.parametrize(
    "model,why",
    [
        (Capped(post=-3.0), "positive cap"),
        (Capped(mask_inside=True), "before the mask"),
    ],
    ids=["negative-cap", "mask-inside-tanh"],
)
def test_soft_capping_it_cannot_read_is_reported(model, why):
    q, k, v, _ = _inputs()
    report = attncc.explain(model, q, k, v, spec=FULL)
    assert not report.sites and why in report.skipped[0], report.skipped


@pytest.mark.parametrize("alibi", [False, True])
def test_falcon_eager(alibi):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, alibi=alibi
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="attncc", options={"spec": FULL})(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # rotary: its `scores /= sqrt(d)` is read as a division; ALiBi: its scores' view as
    # themselves is dropped and `logits *= inv_norm` read out of place: both layers rewritten
    assert attncc.counters["rewritten"] == 2 and attncc.counters["skipped"] == 0


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_bloom(padded):
    """Bloom: baddbmm on [B*H, S, D] operands, its scores viewed as [B, H, Sq, Skv] before the mask
    and viewed back before P @ V; its ALiBi comes from the padding mask (a run-time bias)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BloomConfig(vocab_size=64, hidden_size=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (2, 40))
    kw = {}
    if padded:
        pad = torch.ones(2, 40, dtype=torch.long)
        pad[1, :5] = 0
        kw["attention_mask"] = pad
    with torch.no_grad():
        want = model(ids, use_cache=False, **kw).logits
        got = torch.compile(model, backend="attncc", options={"spec": FULL, "strict": True})(ids, use_cache=False, **kw)
    # padded query rows see no key: zeros here, averaged values in eager (docs/compiler.md)
    torch.testing.assert_close(got.logits[:, 5:], want[:, 5:], atol=1e-5, rtol=0)
    assert attncc.counters["rewritten"] == 2 and attncc.counters["skipped"] == 0


def test_head_views_that_are_not_scores_stay():
    """An attention output [B*H, S, E] viewed as [B, H, S, E] is not a score view: left as it is,
    and the site is still found."""

    class Merged(torch.nn.Module):
        def forward(self, q, k, v):
            s = torch.bmm(q, k.transpose(1, 2)).view(1, 4, 32, 32) * 0.25
            o = torch.bmm(s.softmax(-1).view(4, 32, 32), v)
            return o.view(1, 4, 32, 16)

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 32, 16, generator=g) for _ in range(3))
    compiled_matches(Merged(), q, k, v)
    assert attncc.counters["rewritten"] == 1


class Hazards(torch.nn.Module):
    """In-place spellings that must stay as written: a view taken before the mutation, a dtype
    promotion, an einsum (may be a view), a rounding division."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, m):
        s = q @ k.transpose(-1, -2)
        if self.how == "view_before":
            t = s.view(s.shape)
            s /= 2.0
            return t.softmax(-1) @ v
        if self.how == "promote":
            s += m  # fp16 scores, fp32 bias: stays fp16 in place
            return s.softmax(-1) @ v
        if self.how == "einsum_view":
            s2 = torch.einsum("bhqk->bhqk", s)
            s2.mul_(0.25)
            return s.softmax(-1) @ v
        if self.how == "div_floor":
            s.div_(3.0, rounding_mode="floor")
            return s.softmax(-1) @ v
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["view_before", "promote", "einsum_view", "div_floor"])
def test_in_place_hazards_stay_exact(how):
    g = torch.Generator().manual_seed(0)
    dt = torch.float16 if how == "promote" else torch.float32
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g).to(dt) for _ in range(3))
    m = torch.randn(32, 32, generator=g)  # fp32
    want = Hazards(how)(q.clone(), k, v, m)
    opts = {"spec": FULL, "inner": "eager"}
    got = torch.compile(Hazards(how), backend="attncc", options=opts)(q.clone(), k, v, m)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert attncc.counters["rewritten"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_baddbmm_is_left_as_written(dtype):
    class Bias(torch.nn.Module):
        def forward(self, q, k, v, bias):
            s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.25)
            return torch.bmm(s.softmax(-1), v)

    g = torch.Generator().manual_seed(0)
    q, k, v, bias = (torch.randn(4, 32, 16 if i < 3 else 32, generator=g).to(dtype) for i in range(4))
    bias = torch.randn(4, 32, 32, generator=g).to(dtype)
    want = Bias()(q, k, v, bias)
    got = torch.compile(Bias(), backend="attncc", options={"spec": FULL, "inner": "eager"})(q, k, v, bias)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


class Biased(torch.nn.Module):
    """Scores plus a bias built from positions only (MPT's spelling: slope * (kv - (S - 1)),
    one slope per head), or a bias that is not ALiBi."""

    def __init__(self, kind: str, heads: int):
        super().__init__()
        self.kind, self.heads = kind, heads

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = q @ k.transpose(-1, -2) * 0.25
        pos = torch.arange(1 - n, 1, dtype=torch.int32).view(1, 1, 1, n)
        slopes = 1.0 / torch.pow(2, torch.arange(1, self.heads + 1).float() * (8 / self.heads))
        if self.kind == "alibi":
            bias = pos * slopes.view(1, self.heads, 1, 1)
        elif self.kind == "quadratic":
            d = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)
            bias = -0.01 * (d * d).float()
        else:  # from the data
            bias = q.sum(-1, keepdim=True) * 0.0 + pos * 0.1
        s = s + bias
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, float("-inf"))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("heads", [4, 6], ids=["4-heads", "6-heads"])
def test_alibi_bias_is_read_as_slopes(heads):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, 40, 16, generator=g) for _ in range(3))
    model = Biased("alibi", heads)
    got = compiled_matches(model, q, k, v)
    (site,) = attncc.explain(model, q, k, v, spec=FULL).sites
    assert site.kernel.endswith("alibi_fwd_kernel") and (site.model_mask, site.runtime_mask) == ("causal", None)
    # the bias matters: without it the answer differs
    assert (
        got - torch.softmax((q @ k.mT * 0.25).masked_fill(~torch.ones(40, 40).tril().bool(), -1e9), -1) @ v
    ).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["quadratic", "data"])
def test_a_bias_that_is_not_alibi_stays_a_runtime_tensor(kind):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 32, 16, generator=g) for _ in range(3))
    model = Biased(kind, 4)
    compiled_matches(model, q, k, v)
    (site,) = attncc.explain(model, q, k, v, spec=FULL).sites
    assert "alibi" not in site.kernel


class ShiftedCap(torch.nn.Module):
    """tanh of shifted scores (not a soft-capping) and a fill that the scales bring back up."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = q @ k.transpose(-1, -2) * 0.25
        if self.how == "shift_in_tanh":
            s = torch.tanh(s / 2 + 0.7) * 2
            s = s.masked_fill(~causal, float("-inf"))
        else:  # the fill is -1 after the scale: masked keys still count
            s = s.masked_fill(~causal, -1e4) * 1e-4
        return s.softmax(-1) @ v


@pytest.mark.parametrize("how", ["shift_in_tanh", "fill_scaled_up"])
def test_scores_that_only_look_capped_or_masked_are_left(how):
    q, k, v, _ = _inputs()
    q = q * 4
    model = ShiftedCap(how)
    compiled_matches(model, q, k, v, strict=False)
    assert attncc.counters["rewritten"] == 0 and attncc.counters["skipped"] == 1


def test_a_view_to_another_dtype_is_not_dropped():
    class Bits(torch.nn.Module):
        def forward(self, q, k, v):
            out = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
            return out, (q * 1).view(torch.int32)

    q, k, v, _ = _inputs()
    out, bits = torch.compile(Bits(), backend="attncc", options={"spec": FULL})(q, k, v)
    want_out, want_bits = Bits()(q, k, v)
    assert bits.dtype == torch.int32 and torch.equal(bits, want_bits)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)


class ExpSum(torch.nn.Module):
    """softmax written with exp and sum (plain, and with the row maximum subtracted)."""

    def __init__(self, shifted: bool):
        super().__init__()
        self.shifted = shifted

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = q @ k.transpose(-1, -2) * 0.25
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True)) if self.shifted else s.exp()
        return (e / e.sum(dim=-1, keepdim=True)) @ v


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "max-shifted"])
def test_exp_sum_softmax_is_read_as_softmax(shifted):
    q, k, v, _ = _inputs()
    model = ExpSum(shifted)
    compiled_matches(model, q, k, v)
    (site,) = attncc.explain(model, q, k, v, spec=FULL).sites
    assert (site.model_mask, site.runtime_mask) == ("causal", None)


def test_exp_whose_values_are_read_elsewhere_is_left():
    class Leaky(torch.nn.Module):
        def forward(self, q, k, v):
            e = (q @ k.transpose(-1, -2)).exp()
            return (e / e.sum(-1, keepdim=True)) @ v, e.mean()

    q, k, v, _ = _inputs()
    out, m = torch.compile(Leaky(), backend="attncc", options={"spec": FULL})(q, k, v)
    want, wm = Leaky()(q, k, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(m, wm)
    assert attncc.counters["rewritten"] == 0
