"""attncc.explain: sites, rules, densities and kernel names without computing attention."""

from __future__ import annotations

import pytest
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


TOPK = {"attncc": 1, "block_size": 16, "rules": [{"mask": {"all": ["causal", {"topk": {"k": 1, "block": 16}}]}}]}


def _allowed_pixels(image: torch.Tensor) -> torch.Tensor:
    """The tokens a token-level picture shows as allowed: full blocks, and the dark tokens of
    partial ones."""
    from attncc import draw

    return (image == torch.tensor(draw.FULL_RGB)).all(-1) | (image == torch.tensor(draw.ALLOWED_RGB)).all(-1)


def test_explain_draws_the_selection_the_kernels_used(tmp_path):
    from attncc.codegen import executors

    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(1, 64, 16)
    # the blocks the kernels select for this input, recorded on a run of their own
    used = []
    torch._dynamo.reset()
    with executors.observing(lambda plan, mask, sel: used.append(sel.clone())), torch.no_grad():
        torch.compile(model, backend="attncc", options={"spec": TOPK, "dump_dir": None}, dynamic=False)(x)
    torch._dynamo.reset()
    assert len(used) == 2
    # layer 0's selection recomputed from docs/dynamic.md: among the causal blocks j <= i, the
    # highest mean query block . mean key block (GQA: query head h reads kv head h // 2)
    with torch.no_grad():
        q = model.layers[0](x).view(1, 64, 4, 4).transpose(1, 2)[0]
    qm, km = q.view(4, 4, 16, 4).mean(2), q[:2].view(2, 4, 16, 4).mean(2)
    logits = torch.einsum("hid,hjd->hij", qm, km.repeat_interleave(2, 0))
    logits = logits.masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
    want0 = torch.nn.functional.one_hot(logits.argmax(-1), 4).bool()
    assert torch.equal(used[0][0], want0)

    png = tmp_path / "selection.png"
    report = attncc.explain(model, x, spec=TOPK, png=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    panels = report.panels()
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    for site, sel in zip(report.sites, used):
        mine = [p for p in panels if p.title.startswith(f"#{report.sites.index(site)} ")]
        drawn = {}
        for p in mine:
            heads = p.title.split("heads ")[1].split("\n")[0]
            for h in _heads(heads):
                drawn[h] = p
        assert sorted(drawn) == [0, 1, 2, 3]
        for h, p in drawn.items():
            # the picture's allowed tokens: the selected blocks, within causal
            tokens = sel[0, h].repeat_interleave(16, 0).repeat_interleave(16, 1)
            assert torch.equal(_allowed_pixels(p.image), tokens & causal), (site.layer, h)
            # ... whose fraction is the density explain reports for that head
            assert abs(_allowed_pixels(p.image).float().mean().item() - site.density[h]) < 1e-6
            assert "measured selection" in p.title


def _heads(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def test_drawing_needs_a_measured_selection(tmp_path, monkeypatch):
    import builtins

    dry = attncc.explain(TwoLayers(), torch.randn(1, 64, 16), spec=TOPK, measure=False)
    with pytest.raises(ValueError, match="measure=True"):
        dry.draw(str(tmp_path / "x.png"))
    # a static spec draws without measuring (its block map is the same for every input)
    static = attncc.explain(TwoLayers(), torch.randn(1, 32, 16), spec={"attncc": 1, "rules": [{"mask": {"window": 4}}]})
    assert [p.title.split(",")[0] for p in static.panels()] == ["#0 <top> layer 0", "#1 <top> layer 1"]
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        static.draw(str(tmp_path / "y.png"))
    assert not (tmp_path / "y.png").exists()
