"""Block tables: the kernel's lists of partial and full kv blocks are exactly the block map, in both directions."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_masks import compositions, primitives

from attncc.ir import blocks
from attncc.ir import masks as M
from attncc.ir.blocks import (
    EMPTY,
    FULL,
    PARTIAL,
    build_block_table,
    classify,
    classify_rows,
    count_allowed,
    token_blocks,
)
from attncc.ir.permute import TilePermutation


def table_to_map(counts: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    out = torch.zeros(counts.shape[0], n_cols, dtype=torch.bool)
    for r in range(counts.shape[0]):
        cols = indices[r, : counts[r]].long()
        assert torch.all(cols[1:] > cols[:-1]), "indices must be sorted and distinct"
        out[r, cols] = True
    return out


CASES = [
    ("causal_63_63_16x32", [M.Causal()], 63, 63, 16, 32, None),
    ("streaming_200_300", [M.conj(M.Causal(), M.Any_((M.Sink(4), M.Window(49, 0))))], 200, 300, 32, 64, None),
    ("duo_two_programs", [M.Causal(), M.All((M.Causal(), M.Window(15, 0)))], 257, 257, 64, 16, None),
    ("random_heads", [M.RandomBlocks(2, 3, 32), M.RandomBlocks(2, 3, 32)], 128, 128, 32, 32, None),
    ("tile3d_permuted", [M.Tile3D((2, 8, 16), (1, 2, 2))], 256, 256, 16, 32, TilePermutation((2, 8, 16), (2, 2, 4))),
]


@pytest.mark.parametrize("name, masks, q_len, kv_len, bq, bkv, perm", CASES, ids=[c[0] for c in CASES])
def test_block_table_lists_exactly_the_classified_blocks(name, masks, q_len, kv_len, bq, bkv, perm):
    order = None if perm is None else perm.index()
    heads = list(range(len(masks)))
    table = build_block_table(masks, heads, q_len, kv_len, bq, bkv, order, order)
    nk = -(-kv_len // bkv)
    assert table.num_kv_blocks == nk and table.num_q_blocks == -(-q_len // bq)
    for i, (mask, head) in enumerate(zip(masks, heads)):
        labels = classify(mask, q_len, kv_len, bq, bkv, head=head, q_order=order, kv_order=order)
        partial = table_to_map(table.kv_num_blocks[i], table.kv_indices[i], nk)
        full = table_to_map(table.full_num_blocks[i], table.full_indices[i], nk)
        assert torch.equal(partial, labels == PARTIAL) and torch.equal(full, labels == FULL)
        assert int(table.visited()[i]) == int((labels != EMPTY).sum())

    back = table.transposed()
    assert (back.block_q, back.block_kv) == (bkv, bq) and back.num_kv_blocks == table.num_q_blocks
    for i in range(len(masks)):
        partial = table_to_map(table.kv_num_blocks[i], table.kv_indices[i], nk)
        full = table_to_map(table.full_num_blocks[i], table.full_indices[i], nk)
        nq = table.num_q_blocks
        assert torch.equal(table_to_map(back.kv_num_blocks[i], back.kv_indices[i], nq), partial.T)
        assert torch.equal(table_to_map(back.full_num_blocks[i], back.full_indices[i], nq), full.T)


def test_head_dependent_programs_get_their_own_table_rows():
    mask = M.RandomBlocks(1, 11, 32)
    table = build_block_table([mask, mask], [0, 5], 256, 256, 32, 32)
    assert not torch.equal(table.full_indices[0], table.full_indices[1])


def test_permutation_index_and_inverse():
    perm = TilePermutation((2, 4, 6), (1, 2, 3))
    idx, inv = perm.index(), perm.inverse()
    assert sorted(idx.tolist()) == list(range(48))
    assert torch.equal(idx[inv], torch.arange(48)) and torch.equal(inv[idx], torch.arange(48))
    # the first tile is frame 0, rows 0-1, columns 0-2 of the raster grid
    assert idx[:6].tolist() == [0, 1, 2, 6, 7, 8]
    with pytest.raises(M.MaskError, match="holds 48 tokens but the query length is 40"):
        perm.check(40, "query")


def test_large_banded_mask_classifies_in_closed_form_without_dense_memory():
    """131072 tokens: the block map is built in bounded chunks (a dense mask would be 16 GiB)."""
    mask = M.All((M.Causal(), M.Any_((M.Sink(128), M.Window(4095, 0)))))
    labels = classify(mask, 131072, 131072, 64, 64)
    assert labels.shape == (2048, 2048)
    row = labels[1000]
    assert row[:2].eq(FULL).all() and row[1000].item() == PARTIAL and row[1001:].eq(EMPTY).all()
    assert (
        row[1000 - 63 : 1000].eq(FULL).all() and row[1000 - 64].item() == PARTIAL and row[2 : 1000 - 64].eq(EMPTY).all()
    )


# -- coarse-to-fine classification against the brute-force path (bounds on every block pair) ---------------

COARSE = settings(
    max_examples=80,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def brute_force_map(mask, q_len, kv_len, bq, bkv, head, order, q_offset):
    qb = token_blocks(q_len, bq, order, q_offset)
    kb = token_blocks(kv_len, bkv, order)
    return torch.cat([lab for _, lab in classify_rows(mask, qb, kb, head, q_len, kv_len)], 0)


def check_against_brute_force(mask, q_len, kv_len, bq, bkv, head=0, order=None, q_offset=0):
    expected = brute_force_map(mask, q_len, kv_len, bq, bkv, head, order, q_offset)
    got = classify(mask, q_len, kv_len, bq, bkv, head, order, order, q_offset)
    bad = (got != expected).nonzero()
    assert bad.numel() == 0, (
        f"{mask}: block {bad[0].tolist()} got {got[tuple(bad[0])]}, brute force {expected[tuple(bad[0])]}"
    )
    table = build_block_table([mask], [head], q_len, kv_len, bq, bkv, order, order, q_offset)
    nk = expected.shape[1]
    assert torch.equal(table_to_map(table.kv_num_blocks[0], table.kv_indices[0], nk), expected == PARTIAL)
    assert torch.equal(table_to_map(table.full_num_blocks[0], table.full_indices[0], nk), expected == FULL)
    total, counts = count_allowed(mask, q_len, kv_len, bq, bkv, head, order, order, q_offset)
    assert counts.tolist() == [int((expected == c).sum()) for c in (EMPTY, PARTIAL, FULL)]
    assert total == int(M.dense(mask, q_len, kv_len, heads=[head], q_offset=q_offset).sum())


def small_levels(fanout: int, top_pairs: int, runs_fraction: int = 16):
    """Shrink the super-block fan-out and the top level so that small maps use several levels;
    ``runs_fraction`` 1 builds every table from row runs, in batches of few cells."""
    return mock.patch.multiple(
        blocks,
        _FANOUT=fanout,
        _TOP_PAIRS=top_pairs,
        _CHILD_PAIRS=fanout * fanout * 40,
        _RUNS_FRACTION=runs_fraction,
        _RASTER_CELLS=64 if runs_fraction == 1 else blocks._RASTER_CELLS,
    )


LEVELS = st.sampled_from([(2, 1, 1), (3, 2, 16), (8, 4, 1), (8, 4, 16)])


@COARSE
@given(
    mask=compositions(primitives(600)),
    q_len=st.one_of(st.sampled_from([1, 63, 65, 500]), st.integers(1, 600)),
    kv_len=st.one_of(st.sampled_from([1, 63, 65, 500]), st.integers(1, 600)),
    blocks_=st.sampled_from([(16, 16), (16, 32), (32, 16), (64, 64)]),
    head=st.integers(0, 3),
    levels=LEVELS,
    data=st.data(),
)
def test_coarse_to_fine_matches_brute_force(mask, q_len, kv_len, blocks_, head, levels, data):
    q_offset = data.draw(st.integers(0, kv_len - q_len)) if kv_len > q_len else 0
    with small_levels(*levels):
        check_against_brute_force(mask, q_len, kv_len, *blocks_, head=head, q_offset=q_offset)


PERMUTED = [
    ((4, 8, 16), (2, 4, 4)),
    ((3, 6, 10), (1, 3, 5)),
    ((2, 16, 16), (1, 4, 8)),
]


@settings(COARSE, max_examples=40)
@given(grid_tile=st.sampled_from(PERMUTED), permuted=st.booleans(), levels=LEVELS, data=st.data())
def test_coarse_to_fine_matches_brute_force_tile3d_and_permutation(grid_tile, permuted, levels, data):
    grid, tile = grid_tile
    n = grid[0] * grid[1] * grid[2]
    tile3d = st.tuples(*(st.integers(0, g) for g in grid)).map(lambda w: M.Tile3D(grid, w))
    mask = data.draw(compositions(st.one_of(tile3d, primitives(n))))
    order = TilePermutation(grid, tile).index() if permuted else None
    bq, bkv = data.draw(st.sampled_from([(8, 8), (16, 32), (32, 16)]))
    with small_levels(*levels):
        check_against_brute_force(mask, n, n, bq, bkv, order=order)


def test_large_maps_settle_super_blocks_without_bounding_every_pair():
    """1M tokens: a sliding window settles whole empty and full super-blocks, so only the band's
    edges reach the kernel's blocks (bounding every pair would need 268M bounds)."""
    mask = M.All((M.Causal(), M.Window(4095, 0)))
    n, nb = 1 << 20, 1 << 14
    total, counts = count_allowed(mask, n, n, 64, 64)
    # query q sees min(q + 1, 4096) keys
    assert total == 4096 * 4097 // 2 + (n - 4096) * 4096
    # block row i: the diagonal block and (from row 64 on) the block 64 back are partial, those between full
    partial, full = nb + (nb - 64), sum(range(64)) + (nb - 64) * 63
    assert counts.tolist() == [nb * nb - partial - full, partial, full]


def streaming_plan(tokens: int, dtype: str = "float32", heads: tuple[int, ...] = (0, 0, 1, 1)):
    from attncc.ir.plan import AttentionPlan

    streaming = M.All((M.Causal(), M.Any_((M.Sink(128), M.Window(4095, 0)))))
    return AttentionPlan(
        programs=(streaming, M.Causal()),
        head_to_program=heads,
        num_heads=len(heads),
        num_kv_heads=2,
        q_len=tokens,
        kv_len=tokens,
        head_dim=16,
        head_dim_v=16,
        dtype=dtype,
        scale=0.25,
    )


def test_head_density_is_exact_without_a_dense_mask():
    """explain's per-head density at 128k tokens, where [H, Sq, Skv] would be 64 GiB, against closed forms;
    and on a small plan against the dense mask."""
    from attncc.explain import head_density

    n = 131072
    streaming = 4096 * 4097 // 2 + (n - 4096) * 4096 + (n - 4096) * 128
    causal = n * (n + 1) // 2
    expected = [round(x / n / n, 4) for x in (streaming, streaming, causal, causal)]
    assert head_density(streaming_plan(n)) == expected
    small = streaming_plan(300)
    dense = small.dense_mask().flatten(1).double().mean(1)
    assert head_density(small) == [round(float(x), 4) for x in dense]


def test_plan_block_tables_are_shared_by_plans_that_differ_only_outside_the_mask():
    a, b = streaming_plan(1000, "float32"), streaming_plan(1000, "bfloat16")
    assert a != b and a.block_table() is b.block_table()
    # the same programs with another head assignment list the same rows; other lengths do not
    assert streaming_plan(1000, heads=(1, 1, 0, 0)).block_table() is a.block_table()
    longer = dataclasses.replace(a, kv_len=1010, q_offset=10)
    assert longer.block_table() is not a.block_table() and longer.block_table().num_kv_blocks == 16
