"""attncc.explain: sites, rules, densities and kernel names without computing attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attncc
from attncc.config import config
from attncc.counters import counters


class TwoLayers(torch.nn.Module):
    """Two causal SDPA calls from the top module, 4 query heads over 2 kv heads."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])

    def forward(self, x):
        for lin in self.layers:
            q = lin(x).view(1, -1, 4, 4).transpose(1, 2)
            kv = q[:, :2]
            x = x + F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(
                1, -1, 16
            )
        return x


def test_explain_reports_layers_rules_density(monkeypatch, tmp_path):
    import attncc.codegen.executors as ex

    def no_attention(*a, **k):
        raise AssertionError("explain must not run attention")

    monkeypatch.setattr(ex, "run", no_attention)
    spec = {
        "attncc": 1,
        "rules": [{"name": "first", "where": {"layers": "0"}, "mask": {"window": 4}}, {"name": "rest", "mask": "full"}],
    }
    counters.clear()
    # a dry run: nothing dumped even with ATTNCC_DUMP_DIR set, the compile counters untouched
    with config.scope(dump_dir=str(tmp_path)):
        report = attncc.explain(TwoLayers(), torch.randn(1, 32, 16), spec=spec)
    assert not any(tmp_path.iterdir()) and not any(counters.values())
    # SDPA is called in the top module: no layer number in its path, so layers count by order of appearance
    assert [(s.module, s.layer, s.rule) for s in report.sites] == [("", 0, "first"), ("", 1, "rest")]
    s0, s1 = report.sites
    assert (s0.num_heads, s0.num_kv_heads, s0.q_len, s0.kv_len, s0.head_dim) == (4, 2, 32, 32, 4)
    assert s0.model_mask == "causal"
    causal = (32 * 33 / 2) / 32**2
    window = (4 * 32 - 6) / 32**2
    assert abs(s0.density[0] - window) < 1e-3 and abs(s1.density[0] - causal) < 1e-3
    assert s0.kernel.endswith("_fwd_kernel")
    text = str(report)
    assert "<top>" in text and "first" in text and "2 attention sites" in text


class PaddedAttention(torch.nn.Module):
    """One SDPA call with a bool padding mask (keys the model passes at run time), 2 heads."""

    def forward(self, x, keep):
        q = x.view(2, -1, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=keep[:, None, None, :])


def test_explain_measures_a_topk_selection_on_the_given_inputs():
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": {"all": ["causal", {"topk": {"k": 1, "block": 16}}]}}]}
    report = attncc.explain(TwoLayers(), torch.randn(1, 64, 16), spec=spec)
    for s in report.sites:
        assert s.density is not None and all(0 < d < 1 for d in s.density), s.density
        assert any("measured" in n for n in s.notes)
        # one 16 x 16 block per query block of 4, within causal: at most 4 * 256 pairs of 64 * 64
        assert all(d <= 4 * 16 * 16 / 64**2 + 1e-9 for d in s.density)
    assert "-" not in str(report).splitlines()[2].split()[-2]  # the density column is numeric
    dry = attncc.explain(TwoLayers(), torch.randn(1, 64, 16), spec=spec, measure=False)
    assert all(s.density is None for s in dry.sites)


def test_explain_measures_a_padding_mask():
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[1, 16:] = False  # the second sequence has 16 real keys
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": {"window": {"before": 4, "after": 4}}}]}
    report = attncc.explain(PaddedAttention(), torch.randn(2, 24, 16), keep, spec=spec)
    (site,) = report.sites
    q = torch.arange(24)[:, None]
    k = torch.arange(24)[None, :]
    window = (q - 4 <= k) & (k <= q + 4)  # docs/spec.md: window before/after
    want = (window[None] & keep[:, None, :]).float().mean().item()
    assert site.density is not None and all(abs(d - want) < 1e-6 for d in site.density)
