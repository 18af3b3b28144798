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
