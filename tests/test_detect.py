"""Hand-written attention spellings are detected and rewritten exactly; non-attention is left alone."""

from __future__ import annotations

import math

import pytest
import torch

from attncc.counters import counters

B, H, HKV, S, D = 2, 4, 2, 12, 8


def _split(x, h):
    return x.view(B, -1, h, D).transpose(1, 2)


class Spelling(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, q, k, v, mask):
        return self.body(q, k, v, mask) + 1.0


def causal(s=S, skv=S):
    return torch.ones(s, skv, dtype=torch.bool).tril()


def matmul_div_masked_fill(q, k, v, m):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(~causal(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def mt_mul_where(q, k, v, m):
    s = torch.matmul(q * 0.5, k.mT) * (1 / math.sqrt(D) / 0.5)
    s = torch.where(m, s, torch.tensor(float("-inf")))
    return torch.nn.functional.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


def bmm_3d(q, k, v, m):
    q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
    p = torch.bmm(q3, k3.transpose(1, 2)).mul(D**-0.5).softmax(-1)
    return torch.bmm(p, v3).view(B, H, S, D)


def einsum_bshd(q, k, v, m):
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D]
    s = torch.einsum("bqhd,bkhd->bhqk", qs, ks) * D**-0.5 + m
    return torch.einsum("bhqk,bkhd->bqhd", s.float().softmax(-1), vs).transpose(1, 2)


def gqa_expand(q, k, v, m):
    k, v = k[:, :HKV], v[:, :HKV]
    k = k[:, :, None].expand(B, HKV, H // HKV, S, D).reshape(B, H, S, D)
    v = v[:, :, None].expand(B, HKV, H // HKV, S, D).reshape(B, H, S, D)
    s = q @ k.transpose(2, 3) * D**-0.5 + torch.zeros(S, S).masked_fill(~causal(), float("-inf"))
    return s.softmax(-1) @ v


def gqa_repeat_interleave(q, k, v, m):
    k = k[:, :HKV].repeat_interleave(H // HKV, dim=1)
    v = v[:, :HKV].repeat_interleave(H // HKV, dim=1)
    return torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1) @ v


def cross_attention(q, k, v, m):
    kk, vv = torch.cat([k, k[:, :, :5]], 2), torch.cat([v, v[:, :, :5]], 2)
    return (q[:, :, :7] @ kk.transpose(-1, -2) * 0.3).softmax(-1) @ vv


SPELLINGS = {
    "matmul-div-masked_fill": (matmul_div_masked_fill, "causal"),
    "mT-prescaled-where-dtype": (mt_mul_where, "full"),  # input mask: kept as a runtime tensor
    "bmm-3d": (bmm_3d, "full"),
    "einsum-bshd-additive": (einsum_bshd, "full"),
    "gqa-expand-reshape": (gqa_expand, "causal"),
    "gqa-repeat_interleave": (gqa_repeat_interleave, "full"),
    "cross-attention": (cross_attention, "full"),
}


def inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    win = causal() & ~torch.ones(S, S, dtype=torch.bool).tril(-3)
    return q, k, v, win


pytestmark = pytest.mark.usefixtures("fresh_compiler")


def _run(body, dump_dir=None):
    q, k, v, m = inputs()
    mod = Spelling(body)
    opts = {"inner": "eager", "executor": "reference"}
    if dump_dir:
        opts["dump_dir"] = dump_dir
    arg = m if body is not einsum_bshd else torch.randn(S, S)
    ref = mod(q, k, v, arg)
    out = torch.compile(mod, backend="attncc", options=opts, fullgraph=True)(q, k, v, arg)
    return out, ref


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_rewritten_exactly(name, tmp_path):
    import json

    body, own_mask = SPELLINGS[name]
    out, ref = _run(body, str(tmp_path))
    assert counters["detected"] == 1 and counters["rewritten"] == 1, dict(counters)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (folder,) = tmp_path.iterdir()
    (site,) = json.loads((folder / "manifest.json").read_text())["sites"]
    assert site["model_mask"] == own_mask
    if name.startswith("gqa-expand"):
        assert site["num_kv_heads"] == HKV and site["gqa"] == "repeat"


def softmax_not_over_qk(q, k, v, m):
    return torch.softmax(q.sum(-1, keepdim=True) * k, dim=-1) @ v.transpose(-1, -2) @ v


def probs_returned(q, k, v, m):
    p = (q @ k.transpose(-1, -2)).softmax(-1)
    return (p @ v).sum() + p.sum()


def training_dropout(q, k, v, m):
    p = torch.nn.functional.dropout((q @ k.transpose(-1, -2)).softmax(-1), p=0.5, training=True)
    return p @ v


@pytest.mark.parametrize(
    "body,skipped",
    # a softmax feeding a product looks like attention: left as written, and reported with why
    [(softmax_not_over_qk, 1), (probs_returned, 1), (training_dropout, 1)],
    ids=["softmax-not-over-qk", "probabilities-returned", "training-dropout"],
)
def test_negative_cases_left_untouched(body, skipped):
    q, k, v, m = inputs()
    mod = Spelling(body)
    torch.manual_seed(0)
    ref = mod(q, k, v, m)
    out = torch.compile(mod, backend="attncc", options={"inner": "eager", "executor": "reference"}, fullgraph=True)
    torch.manual_seed(0)
    got = out(q, k, v, m)
    assert counters["rewritten"] == 0 and counters["skipped"] == skipped, dict(counters)
    if body is not training_dropout:
        torch.testing.assert_close(got, ref)
