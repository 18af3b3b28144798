"""Golden files: the printed plan a spec gives known shapes, and a small model's graph after every
pass. A refactor that claims no behaviour change shows no diff here; ``ATTNCC_UPDATE_GOLDEN=1``
rewrites the files after a deliberate change (review the diff)."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from attncc.backend import Options
from attncc.passes import pipeline
from attncc.spec import SiteShape, load_spec, plan_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("ATTNCC_UPDATE_GOLDEN") == "1"

pytestmark = pytest.mark.usefixtures("fresh_compiler")


def check_golden(path: pathlib.Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with ATTNCC_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path.name} differs from {path}; ATTNCC_UPDATE_GOLDEN=1 accepts the change"


#: spec file -> the shape its plans are printed at (layer, heads, kv heads, q_len, kv_len)
PLANS = {
    "streaming": [(0, 8, 2, 2048, 2048), (5, 8, 2, 2048, 2048)],
    "duo": [(0, 8, 8, 1024, 1024)],
    "bigbird": [(0, 4, 4, 1000, 1000)],
    "video_tile": [(0, 2, 2, 1024, 1024)],
    "block_diffusion": [(0, 4, 4, 500, 500)],
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_printed_plans(name):
    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    text = []
    for layer, heads, kv_heads, q_len, kv_len in PLANS[name]:
        shape = SiteShape(heads, q_len, kv_len, layer, "model.layers.0.self_attn", num_kv_heads=kv_heads)
        plan = plan_for(spec, shape)
        text.append(f"# layer {layer}\n{plan.describe() if plan else 'no rule matches'}\n")
    check_golden(GOLDEN / "plans" / f"{name}.txt", "\n".join(text))


class TwoAttentions(torch.nn.Module):
    """A causal SDPA with GQA, then a hand-written softmax(QK^T)V with a sliding-window mask built
    from positions, eval-mode dropout on the probabilities and an additive padding mask."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, q, k, v, pad):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        pos = torch.arange(q.shape[2])
        window = (pos[:, None] - pos[None, :] >= 0) & (pos[:, None] - pos[None, :] < 8)
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (a @ kk.transpose(-1, -2)) / 4.0 + pad
        scores = scores.masked_fill(~window, float("-inf"))
        return self.drop(scores.softmax(-1)) @ vv


def graph_text(gm: fx.GraphModule) -> str:
    """The graph's nodes (no source paths or line numbers, which vary between checkouts)."""
    return str(gm.graph).strip() + "\n"


SPEC = """
attncc: 1
name: golden
block_size: 16
rules:
  - where: {layers: 0}
    mask: {all: [causal, {any: [{sink: 2}, {window: 8}]}]}
    heads: {"1": causal}
  - mask: full
"""


def test_graph_after_each_pass():
    stages: list[tuple[str, str]] = []

    def backend(gm, example_inputs):
        opts = Options.parse({"spec": SPEC, "inner": "eager", "executor": "reference"})
        snapshots = []
        st = pipeline.PipelineState(opts.spec, opts.executor)
        pipeline.run(gm, st, on_stage=lambda name, g, summary: snapshots.append((name, summary, graph_text(g))))
        stages.extend((name, f"# {summary}\n{text}" if summary else text) for name, summary, text in snapshots)
        return gm.forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 32, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 32, 16, generator=g)
    pad = torch.zeros(1, 1, 1, 32)
    model = TwoAttentions().eval()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(q, k, v, pad)
    assert [name for name, _ in stages] == ["input", "normalize", "detect", "bind", "rewrite", "thread-selections"]
    for i, (name, text) in enumerate(stages):
        check_golden(GOLDEN / "passes" / f"{i:02d}_{name}.txt", text)
    # the passes did their job: both sites became one op call each
    assert stages[-1][1].count("torch.ops.attncc.attention.default") == 2
