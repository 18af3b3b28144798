"""Tile orders over the video part of a joint text + video sequence (``permute: {grid, tile, text}``):
the text tokens keep their slots, the video tokens are regrouped; every executor equals fp64
attention under the text + tile3d mask written in this file, and tiling leaves fewer blocks to
visit than the raster order."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.codegen import executors as E
from attncc.ir.permute import TilePermutation

GRID, WINDOW, TILE, TEXT = (2, 4, 8), (0, 1, 1), (1, 2, 4), 24


def allowed(at: str) -> torch.Tensor:
    """[S, S]: text tokens see and are seen by all; video tokens by the tile3d window."""
    t, h, w = GRID
    v = t * h * w
    n = v + TEXT
    pos = torch.arange(n)
    is_text = pos < TEXT if at == "start" else pos >= v
    vid = pos - TEXT if at == "start" else pos
    ct, ch, cw = vid // (h * w), (vid // w) % h, vid % w
    near = ((ct[:, None] - ct[None, :]).abs() <= WINDOW[0]) & ((ch[:, None] - ch[None, :]).abs() <= WINDOW[1])
    near &= (cw[:, None] - cw[None, :]).abs() <= WINDOW[2]
    return is_text[:, None] | is_text[None, :] | near


def spec(at: str, permute: bool, grid=GRID, window=WINDOW, tile=TILE) -> dict:
    text = {"tokens": TEXT, "at": at}
    rule: dict = {"mask": {"tile3d": {"grid": list(grid), "window": list(window), "text": text}}}
    if permute:
        rule["permute"] = {"grid": list(grid), "tile": list(tile), "text": text}
    return {"attncc": 1, "block_size": 16, "rules": [rule]}


@pytest.mark.parametrize("at", ["start", "end"])
def test_index_keeps_text_slots(at):
    perm = TilePermutation(GRID, TILE, TEXT, at)
    idx = perm.index()
    v = 64
    assert sorted(idx.tolist()) == list(range(v + TEXT))
    text_slots = slice(0, TEXT) if at == "start" else slice(v, v + TEXT)
    base = 0 if at == "start" else v
    assert idx[text_slots].tolist() == list(range(base, base + TEXT))
    assert torch.equal(perm.inverse()[idx], torch.arange(v + TEXT))


@pytest.mark.parametrize("executor", ["interpret", "torch"])
@pytest.mark.parametrize("at", ["start", "end"])
def test_permuted_text_video_matches_fp64(at, executor):
    n = 64 + TEXT
    plan = attncc.plan_for(attncc.load_spec(spec(at, True)), attncc.SiteShape(num_heads=2, q_len=n, head_dim=16))
    assert torch.equal(attncc.dense_mask(spec(at, True), n, num_heads=1)[0], allowed(at))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    out, lse = E.run(plan, q, k, v, None, executor=executor)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * plan.scale
    ref = torch.softmax(s.masked_fill(~allowed(at), float("-inf")), -1) @ vd
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=0)
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    grads = E.run_backward(plan, q, k, v, out, lse, dout, executor=executor)
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)


def test_tiles_visit_fewer_blocks_than_raster():
    """Frames wider than two blocks (2 x 16 x 32, docs/spec.md Permutations): 2 x 2 x 4 tiles."""
    grid, window, tile = (2, 16, 32), (1, 2, 2), (2, 2, 4)
    n = 2 * 16 * 32 + TEXT
    shape = attncc.SiteShape(num_heads=1, q_len=n, head_dim=16)
    visited = {
        p: int(
            attncc.plan_for(attncc.load_spec(spec("start", p, grid, window, tile)), shape).block_table().visited().sum()
        )
        for p in (False, True)
    }
    assert visited[True] < visited[False], visited


def test_bad_permutation_text_is_refused():
    bad = spec("start", True)
    bad["rules"][0]["permute"]["text"] = {"tokens": TEXT + 1, "at": "start"}
    with pytest.raises(attncc.SpecError, match="text tokens holds"):
        attncc.plan_for(attncc.load_spec(bad), attncc.SiteShape(num_heads=1, q_len=64 + TEXT, head_dim=16))
    bad["rules"][0]["permute"]["text"] = {"tokens": TEXT, "at": "middle"}
    with pytest.raises(attncc.SpecError):
        attncc.load_spec(bad)
