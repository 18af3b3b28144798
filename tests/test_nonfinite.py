"""A NaN or infinite key reaches exactly the rows that may see it, on every executor, at
prefill, decode and chunk shapes: the rows that are NaN equal those of attention written here
with the mask applied by selection (``where``), the definition in docs/compiler.md."""

from __future__ import annotations

import pytest
import torch
from support import make_plan

from attncc.codegen import executors
from attncc.ir import masks as M

SHAPES = {
    "prefill": {"q_len": 70, "kv_len": 70},
    "decode": {"q_len": 1, "kv_len": 70, "q_offset": 69},
    "chunk": {"q_len": 6, "kv_len": 70, "q_offset": 64},
}
MASKS = {
    "window": M.All((M.Causal(), M.Window(4, 0))),
    "sink_window": M.All((M.Causal(), M.Any_((M.Sink(2), M.Window(8, 0))))),
    "causal": M.Causal(),
}


def nan_rows_by_selection(plan, q, k, v) -> torch.Tensor:
    """``[B, H, Sq]`` bool: rows whose output is NaN when masked pairs are removed by selection."""
    g = plan.gqa_group
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ kd.transpose(-1, -2) * plan.scale
    allowed = plan.dense_mask().unsqueeze(0)
    scores = torch.where(allowed, scores, float("-inf"))
    p = torch.where(allowed, torch.softmax(scores, -1), 0.0)
    return torch.isnan(p @ vd).any(-1)


@pytest.mark.parametrize("executor", ["torch", "interpret", "reference"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_bad_key_reaches_only_rows_that_see_it(bad, shape, executor):
    for name, mask in MASKS.items():
        plan = make_plan(mask, heads=4, kv_heads=2, head_dim=16, block=16, **SHAPES[shape])
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, plan.q_len, 16, generator=g)
        k = torch.randn(1, 2, plan.kv_len, 16, generator=g)
        v = torch.randn(1, 2, plan.kv_len, 16, generator=g)
        for pos in (1, plan.kv_len - 3):  # a sink key, a key inside the newest window
            kk = k.clone()
            kk[0, 1, pos, 3] = bad
            out, _ = executors.run(plan, q, kk, v, executor=executor)
            want = nan_rows_by_selection(plan, q, kk, v)
            got = torch.isnan(out).any(-1)
            assert torch.equal(got, want), (
                f"{name} key {pos}: NaN rows {got.nonzero().tolist()} != {want.nonzero().tolist()}"
            )
            finite = ~want.unsqueeze(-1).expand_as(out)
            clean, _ = executors.run(plan, q, k, v, executor=executor)
            # rows that cannot see the bad key are the clean rows of rows that see only good keys
            sees = plan.dense_mask()[:, :, pos].unsqueeze(0).unsqueeze(-1).expand_as(out).clone()
            sees[:, :2] = False  # heads of kv head 0 never see kv head 1's key
            same = finite & ~sees
            torch.testing.assert_close(out[same], clean[same], atol=1e-5, rtol=1e-5)
