"""Mask algebra: the block classifier and the Triton predicates agree exactly with the dense reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mask_cases
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attncc.ir import masks as M
from attncc.ir.blocks import EMPTY, FULL, PARTIAL, classify, count_allowed, token_blocks
from attncc.ir.permute import TilePermutation
from attncc.spec import parse_mask

PROPERTY = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def reference_block_map(allowed: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """EMPTY/PARTIAL/FULL per block pair of a dense [Sq, Skv] mask (padding counts as neither)."""
    sq, skv = allowed.shape
    nq, nk = -(-sq // block_q), -(-skv // block_kv)
    padded = torch.zeros(nq * block_q, nk * block_kv, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[:sq, :skv] = allowed
    valid[:sq, :skv] = True
    padded = padded.view(nq, block_q, nk, block_kv)
    valid = valid.view(nq, block_q, nk, block_kv)
    any_true = padded.any(3).any(1)
    all_true = (padded | ~valid).all(3).all(1)
    return torch.where(all_true, FULL, torch.where(any_true, PARTIAL, EMPTY)).to(torch.int8)


def check_classification(
    mask: M.Mask,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    head: int = 0,
    order: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    allowed = M.dense(mask, q_len, kv_len, heads=[head], q_offset=q_offset)[0]
    kernel_order = allowed if order is None else allowed[order][:, order]
    expected = reference_block_map(kernel_order, block_q, block_kv)
    got = classify(mask, q_len, kv_len, block_q, block_kv, head=head, q_order=order, kv_order=order, q_offset=q_offset)
    assert got.shape == expected.shape
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, (
        f"{mask}: block {mismatch[0].tolist()} got {got[tuple(mismatch[0])]}, dense says {expected[tuple(mismatch[0])]}"
    )
    total, counts = count_allowed(
        mask, q_len, kv_len, block_q, block_kv, head=head, q_order=order, kv_order=order, q_offset=q_offset
    )
    assert total == int(allowed.sum())
    assert counts.tolist() == [int((expected == c).sum()) for c in (EMPTY, PARTIAL, FULL)]
    return got


SIZES = st.one_of(st.sampled_from([1, 2, 63, 64, 65, 200, 1000]), st.integers(1, 300))
BLOCKS = st.sampled_from([16, 32, 64, 128])


def primitives(max_len: int = 1000) -> st.SearchStrategy[M.Mask]:
    n = st.integers(1, max_len + 5)
    return st.one_of(
        st.just(M.Full()),
        st.just(M.Causal()),
        n.map(lambda w: M.Window(w - 1, 0)),
        st.builds(M.Window, st.integers(0, max_len), st.integers(0, max_len)),
        n.map(M.Sink),
        n.map(M.Prefix),
        n.map(M.Global),
        st.integers(1, 300).map(M.Chunk),
        st.integers(1, 300).map(M.BlockCausal),
        st.integers(1, 40).map(M.Strided),
        st.integers(1, 80).map(M.Power),
        st.builds(M.RandomBlocks, st.integers(1, 3), st.integers(0, 99), st.sampled_from([16, 32, 48, 64, 100])),
    )


def compositions(leaves: st.SearchStrategy[M.Mask]) -> st.SearchStrategy[M.Mask]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: M.All(tuple(xs))),
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: M.Any_(tuple(xs))),
            inner.map(M.Not),
        ),
        max_leaves=5,
    )


@PROPERTY
@given(
    mask=compositions(primitives()),
    q_len=SIZES,
    kv_len=SIZES,
    block_q=BLOCKS,
    block_kv=BLOCKS,
    head=st.integers(0, 3),
    data=st.data(),
)
def test_classify_matches_dense(mask, q_len, kv_len, block_q, block_kv, head, data):
    q_offset = data.draw(st.integers(0, kv_len - q_len)) if kv_len > q_len else 0
    check_classification(mask, q_len, kv_len, block_q, block_kv, head=head, q_offset=q_offset)


GRIDS = [
    ((2, 4, 8), (1, 2, 4)),
    ((4, 8, 8), (2, 4, 8)),
    ((3, 6, 10), (1, 3, 5)),
    ((1, 5, 7), (1, 5, 7)),
    ((8, 4, 4), (2, 2, 2)),
]


@PROPERTY
@given(grid_tile=st.sampled_from(GRIDS), permuted=st.booleans(), block_q=BLOCKS, block_kv=BLOCKS, data=st.data())
def test_classify_matches_dense_tile3d_and_permutation(grid_tile, permuted, block_q, block_kv, data):
    grid, tile = grid_tile
    n = grid[0] * grid[1] * grid[2]
    window = st.tuples(*(st.integers(0, g) for g in grid))
    tile3d = window.map(lambda w: M.Tile3D(grid, w))
    kernel = st.tuples(*(st.integers(0, (g - 1) // 2).map(lambda r: 2 * r + 1) for g in grid))
    neighborhood = kernel.map(lambda k: M.Neighborhood(grid, k))
    mask = data.draw(compositions(st.one_of(tile3d, neighborhood, primitives(n))))
    order = TilePermutation(grid, tile).index() if permuted else None
    check_classification(mask, n, n, block_q, block_kv, order=order)


def test_every_primitive_has_a_case():
    assert {mask_cases.primitive_of(c) for c in mask_cases.CASES} == set(M.PRIMITIVES)


@pytest.mark.parametrize("case", mask_cases.params(mask_cases.static_cases()))
@pytest.mark.parametrize("n", [1, 63, 75, 200])
def test_classify_matches_dense_for_every_case(case, n):
    mask = mask_cases.mask(case, n)
    try:  # masks over a fixed token layout (grids) take only their own lengths
        mask.check_lengths(max(1, n // 2), n)
        gridded = False
    except M.MaskError:
        gridded = True
    for block_q, block_kv in ((16, 16), (32, 16), (64, 128)):
        check_classification(mask, n, n, block_q, block_kv, head=1)
        if not gridded:
            # a query offset (the last queries of a longer sequence) and a longer kv
            check_classification(mask, max(1, n // 2), n, block_q, block_kv, q_offset=n - max(1, n // 2))
        elif n > 1:
            tile = [g if i == 0 else 1 for i, g in enumerate(mask_cases.grid(n))]
            order = TilePermutation(tuple(mask_cases.grid(n)), tuple(tile)).index()
            check_classification(mask, n, n, block_q, block_kv, order=order)


CASES = {
    "causal": M.Causal(),
    "window5": M.Window(4, 0),
    "window_2_3": M.Window(2, 3),
    "sink3": M.Sink(3),
    "prefix3": M.Prefix(3),
    "global2": M.Global(2),
    "chunk4": M.Chunk(4),
    "block_causal4": M.BlockCausal(4),
    "strided3": M.Strided(3),
    "power1": M.Power(1),
    "power3": M.Power(3),
}


def test_primitive_predicates_exactly_as_documented():
    q = torch.arange(12).view(-1, 1)
    kv = torch.arange(12).view(1, -1)
    d = q - kv
    expected = {
        "causal": kv <= q,
        "window5": (kv > q - 5) & (kv <= q),
        "window_2_3": (q - 2 <= kv) & (kv <= q + 3),
        "sink3": (kv < 3).expand(12, 12),
        "prefix3": (kv < 3).expand(12, 12),
        "global2": (q < 2) | (kv < 2),
        "chunk4": q // 4 == kv // 4,
        "block_causal4": kv // 4 <= q // 4,
        "strided3": d % 3 == 0,
        "power1": (d == 0) | (d == 1) | (d == 2) | (d == 4) | (d == 8),
        "power3": ((d >= 0) & (d < 3)) | (d == 4) | (d == 8),
    }
    for name, mask in CASES.items():
        assert torch.equal(M.dense(mask, 12, 12)[0], expected[name]), name


def test_tile3d_predicate():
    grid, window = (2, 3, 4), (0, 1, 2)
    got = M.dense(M.Tile3D(grid, window), 24, 24)[0]
    coords = [(t, h, w) for t in range(2) for h in range(3) for w in range(4)]
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            assert bool(got[i, j]) == all(abs(x - y) <= r for x, y, r in zip(a, b, window))


def _natten_window_start(index: int, length: int, kernel: int) -> int:
    """NATTEN's ``get_window_start`` at dilation 1, as NATTEN writes it."""
    neighborhood = kernel // 2
    if index < neighborhood:
        return 0
    if index + neighborhood >= length:
        return length - kernel
    return index - neighborhood


@pytest.mark.parametrize("grid, kernel", [((2, 3, 4), (1, 3, 3)), ((3, 5, 7), (3, 3, 5)), ((1, 4, 9), (1, 3, 9))])
def test_neighborhood_predicate_is_natten(grid, kernel):
    n = grid[0] * grid[1] * grid[2]
    got = M.dense(M.Neighborhood(grid, kernel), n, n)[0]
    coords = [(t, h, w) for t in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])]
    for i, a in enumerate(coords):
        starts = [_natten_window_start(x, g, k) for x, g, k in zip(a, grid, kernel)]
        for j, b in enumerate(coords):
            want = all(s <= y < s + k for y, s, k in zip(b, starts, kernel))
            assert bool(got[i, j]) == want, (a, b)
    # unlike tile3d's window, which shrinks at the edges, every query sees exactly kt*kh*kw keys
    assert (got.sum(1) == kernel[0] * kernel[1] * kernel[2]).all()


def test_neighborhood_kernel_must_be_odd_and_fit_the_grid():
    with pytest.raises(M.MaskError, match=r"neighborhood.kernel\[1\] = 2 must be odd"):
        parse_mask({"neighborhood": {"grid": [2, 4, 4], "kernel": [1, 2, 3]}}, {})
    with pytest.raises(M.MaskError, match=r"neighborhood.kernel\[0\] = 3 is larger than grid\[0\] = 2"):
        parse_mask({"neighborhood": {"grid": [2, 4, 4], "kernel": [3, 3, 3]}}, {})


def test_tile3d_length_mismatch_is_reported():
    with pytest.raises(M.MaskError, match="holds 24 tokens but the query length is 20"):
        M.dense(M.Tile3D((2, 3, 4), (1, 1, 1)), 20, 24)


def test_random_blocks_picks_up_to_n_blocks_per_query_block_and_head():
    mask = M.RandomBlocks(n=2, seed=7, block=16)
    allowed = M.dense(mask, 160, 160, num_heads=3)
    per_block = allowed.view(3, 10, 16, 10, 16).any(4).any(2)
    assert (per_block.sum(-1) >= 1).all() and (per_block.sum(-1) <= 2).all()
    assert not torch.equal(allowed[0], allowed[1])  # heads draw differently


def test_selector_has_no_static_face():
    sel = M.Selector("topk", (("k", 4),))
    assert sel.is_dynamic and M.All((M.Causal(), sel)).is_dynamic
    for face in (lambda: M.dense(sel, 4, 4), sel.triton):
        with pytest.raises(M.MaskError, match="selects blocks from the data at run time"):
            face()


def test_not_and_conj():
    assert M.conj(M.Causal(), None, M.Full(), M.All((M.Causal(), M.Sink(4)))) == M.All((M.Causal(), M.Sink(4)))
    assert M.conj() == M.Full()
    assert torch.equal(M.dense(M.Not(M.Causal()), 5, 5), ~M.dense(M.Causal(), 5, 5))


def test_token_blocks_of_a_permutation_summarise_their_tokens():
    order = TilePermutation((2, 4, 4), (1, 2, 2)).index()
    blocks = token_blocks(32, 8, order)
    assert blocks.lo.tolist() == [0, 8, 16, 24] and blocks.hi.tolist() == [7, 15, 23, 31]
    assert blocks.pos[0].tolist() == order[:8].tolist()


def non_empty_fraction(grid, tile, window, block) -> tuple[float, float]:
    """Non-empty block fraction of a tile3d window in raster order and in tiled order."""
    mask, n = M.Tile3D(grid, window), grid[0] * grid[1] * grid[2]
    order = TilePermutation(grid, tile).index()
    raster = classify(mask, n, n, block, block)
    tiled = classify(mask, n, n, block, block, q_order=order, kv_order=order)
    return float((raster != EMPTY).double().mean()), float((tiled != EMPTY).double().mean())


def test_permutation_gain_on_a_wide_video_grid():
    """Frames wider than a block: a raster block is a thin strip of one row, so a 3D window
    touches many blocks; 2x2x4 tiles make it block-local (the grid of specs/video_tile.yaml)."""
    raster, tiled = non_empty_fraction((2, 16, 32), (2, 2, 4), (1, 2, 2), 16)
    print(f"grid 2x16x32, window 1,2,2, 16-token blocks: non-empty raster {raster:.4f}, tiled 2x2x4 {tiled:.4f}")
    assert tiled < 0.5 * raster


def test_permutation_does_not_help_when_a_raster_block_is_already_a_tile():
    """8x16x16 with 64-token blocks: a raster block is already a 1x4x16 tile of one frame,
    so a centered (1, 2, 2) window touches fewer raster blocks than 2x4x8 tiles. Documented
    in docs/spec.md: tiling pays off when frames are wider than about twice the block."""
    raster, tiled = non_empty_fraction((8, 16, 16), (2, 4, 8), (1, 2, 2), 64)
    print(f"grid 8x16x16, window 1,2,2, 64-token blocks: non-empty raster {raster:.4f}, tiled 2x4x8 {tiled:.4f}")
    assert raster < tiled


# -- Triton predicates: each primitive's expression, run in a real kernel under the interpreter ---------------

#: spec nodes: every static case of tests/mask_cases.py at 64 tokens, plus compositions
TRITON_CASES = {
    **{c: mask_cases.CASES[c](64) for c in mask_cases.static_cases()},
    "composed": {"all": ["causal", {"any": [{"sink": 4}, {"not": {"strided": 5}}]}]},
    "window_big": {"window": 41},
    "power7": {"power": 7},
    "random_blocks/other": {"random_blocks": {"n": 2, "seed": 5, "block": 16}},
}

_KERNEL = """
@triton.jit
def pred_{i}(out_ptr, off_h, q_off, KV_LEN, BM: tl.constexpr, BN: tl.constexpr):
    q_pos = (tl.arange(0, BM) + q_off).to(tl.int64)[:, None]
    kv_pos = tl.arange(0, BN).to(tl.int64)[None, :]
    allowed = {expr}
    allowed = allowed & (q_pos >= 0) & (kv_pos >= 0)
    tl.store(out_ptr + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], allowed.to(tl.int8))
"""

_DRIVER = """
import torch
from attncc.ir import masks as M
from attncc.spec import parse_mask
import predicates as P
cases = {cases}
bad = []
for i, name in enumerate(cases):
    mask = parse_mask(cases[name], {{}})
    for head, q_off in ((0, 0), (3, 0), (1, 37)):
        out = torch.full((64, 64), -1, dtype=torch.int8)
        getattr(P, "pred_%d" % i)[(1,)](out, head, q_off, 64, BM=64, BN=64)
        ref = M.dense(mask, 64, 64, heads=[head], q_offset=q_off)[0]
        if not torch.equal(out.bool(), ref) or (out < 0).any():
            bad.append((name, head, q_off, int((out.bool() != ref).sum())))
print("BAD", bad)
"""


def test_triton_predicates_match_dense_under_the_interpreter(tmp_path):
    names = list(TRITON_CASES)
    masks = [parse_mask(TRITON_CASES[n], {}) for n in names]
    kernels = [_KERNEL.format(i=i, expr=m.triton()) for i, m in enumerate(masks)]
    helpers = "".join(dict.fromkeys(h for m in masks for node in m.walk() for h in node.triton_helpers()))
    source = "import triton\nimport triton.language as tl\n" + helpers + "".join(kernels)
    (tmp_path / "predicates.py").write_text(source)
    (tmp_path / "driver.py").write_text(_DRIVER.format(cases=TRITON_CASES))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BAD []" in done.stdout, textwrap.shorten(done.stdout, 2000)


def test_shifted_chunks_are_the_s2_attention_groups():
    """``{chunk: {size, shift}}`` from its definition: (q + S) // B == (kv + S) // B; malformed
    shifts are refused at their key."""
    from attncc.spec import parse_mask as parse

    m = parse({"chunk": {"size": 8, "shift": 4}}, {})
    q, k = torch.arange(40)[:, None], torch.arange(40)[None, :]
    want = (q + 4) // 8 == (k + 4) // 8
    assert torch.equal(M.dense(m, 40, 40)[0], want)
    assert parse({"chunk": {"size": 8}}, {}) == M.Chunk(8) and m.to_spec() == {"chunk": {"size": 8, "shift": 4}}
    for bad, match in (({"size": 8, "shift": 8}, "smaller than chunk.size"), ({"size": 8, "by": 1}, "unknown key")):
        with pytest.raises(M.MaskError, match=match):
            parse({"chunk": bad}, {})
