"""The fast CPU executor against the dense reference: forward, lse and gradients."""

from __future__ import annotations

import dataclasses

import mask_cases
import pytest
import torch
from support import inputs, make_plan

from attncc.codegen import torch_exec
from attncc.codegen.executors import run
from attncc.codegen.forward.reference import attention_reference
from attncc.ir import masks as M
from attncc.ir.dtypes import dtype_name
from attncc.ir.permute import TilePermutation
from attncc.ir.plan import AttentionPlan
from attncc.runtime.registry import register_plan

# fp32: both sides accumulate in fp32 in different orders; fp16/bf16: output rounding only;
# fp64: the log-sum-exp (and so the merge weights) is carried in fp32 by contract
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}


def plan_of(*programs, **kw) -> AttentionPlan:
    """A CPU-executor test plan: 4 heads, 200 tokens, head dim 16, 64-token blocks."""
    return make_plan(*programs, **{"heads": 4, "q_len": 200, "head_dim": 16, "block": 64, **kw})


def attend(plan, q, k, v, mask=None):
    """``(out, lse)`` of the torch executor through the custom op (differentiable)."""
    return torch.ops.attncc.attention(q, k, v, mask, None, None, register_plan(plan), "torch")


def causal_window(n):
    return M.All((M.Causal(), M.Window(n - 1, 0)))


def sink_window(sink, n):
    return M.All((M.Causal(), M.Any_((M.Sink(sink), M.Window(n - 1, 0)))))


CASES = {
    "causal": plan_of(M.Causal()),
    "causal_q_offset_short_q": plan_of(M.Causal(), q_len=100, kv_len=300, q_offset=200),
    "causal_kv_longer_no_offset": plan_of(M.Causal(), q_len=63, kv_len=130),
    "window40_block32": plan_of(causal_window(40), q_len=300, block=32),
    "sink16_window64_seq333": plan_of(sink_window(16, 64), q_len=333),
    "per_head_programs": plan_of(M.Causal(), sink_window(16, 64), head_to_program=(0, 1, 0, 1), q_len=257),
    "gqa3_mixed_programs": plan_of(
        M.Causal(), M.Window(30, 5), head_to_program=(0, 0, 1, 1, 0, 1), heads=6, kv_heads=2, q_len=190
    ),
    "gqa_causal": plan_of(M.Causal(), heads=6, kv_heads=2, q_len=190),
    "block_causal_bq32_bk64": plan_of(M.BlockCausal(64), q_len=300, block=32, block_kv=64),
    "tile3d_permuted": plan_of(
        M.Tile3D((4, 8, 8), (1, 2, 2)), q_len=256, block=32, permute=TilePermutation((4, 8, 8), (2, 4, 4))
    ),
    "random_blocks": plan_of(M.RandomBlocks(2, 3, 32), q_len=200, block=32),
    "full_dv24": plan_of(M.Full(), q_len=130, head_dim_v=24),
    "chunk50": plan_of(M.Chunk(50), q_len=210, block=32),
    "strided_causal": plan_of(M.All((M.Causal(), M.Strided(7))), q_len=150, block=32),
    "no_key_anywhere": plan_of(M.Not(M.Full()), q_len=100),
    "dim80_window": plan_of(M.Window(20, 20), heads=2, q_len=500, head_dim=80),
    # query blocks with 3+ kv runs: one gathered call each, padded kv lengths
    "tile3d_gathered_gqa": plan_of(
        M.Tile3D((4, 8, 16), (1, 2, 3)),
        kv_heads=2,
        q_len=512,
        block=32,
        permute=TilePermutation((4, 8, 16), (2, 4, 4)),
    ),
    "random_blocks_gathered_seq290": plan_of(M.RandomBlocks(3, 5, 32), heads=2, q_len=290, block=32),
}


def qkv(plan, batch=2, grad=False, seed=0):
    return inputs(plan, batch, seed, grad=grad)[:3]


def assert_close_lse(lse, ref):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(lse[fin], ref[fin], atol=2e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Result buffers start as NaN, so a row no call writes (or merges into unset) fails."""
    monkeypatch.setattr(
        torch_exec, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


def check_against_reference(plan: AttentionPlan) -> None:
    q, k, v = qkv(plan, grad=True)
    out, lse = attend(plan, q, k, v)
    ref, ref_lse = attention_reference(plan, q, k, v)
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-5)
    assert_close_lse(lse, ref_lse)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    for got, want, what in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4, msg=lambda m, w=what: f"d{w}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grad_match_reference(name):
    check_against_reference(CASES[name])


@pytest.mark.parametrize("case", mask_cases.params(mask_cases.static_cases()))
def test_every_mask_case(case):
    check_against_reference(plan_of(mask_cases.mask(case, 75), heads=2, kv_heads=1, q_len=75, block=16))


def test_rows_without_keys_are_zero_with_neg_inf_lse():
    plan = CASES["no_key_anywhere"]
    q, k, v = qkv(plan)
    out, lse = attend(plan, q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_low_and_high_precision(dtype):
    plan = dataclasses.replace(CASES["sink16_window64_seq333"], dtype=dtype_name(dtype))
    q, k, v = qkv(plan)
    out, lse = attend(plan, q, k, v)
    ref, ref_lse = attention_reference(plan, q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_runtime_mask_tensor(kind):
    plan = plan_of(M.Window(20, 20), q_len=150, mask_kind=kind)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(2, 1, 150, 150, generator=g) > 0.3
        mask[0, 0, 5] = False  # a row with no key at all
    else:
        mask = torch.randn(2, 4, 1, 150, generator=g)
    q, k, v = qkv(plan, grad=True)
    out, lse = attend(plan, q, k, v, mask)
    ref, ref_lse = attention_reference(plan, q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert_close_lse(lse, ref_lse)
    dout = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad((out * dout).sum(), (q, k, v)), torch.autograd.grad((ref * dout).sum(), (q, k, v))
    ):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_visits_only_block_table_pairs():
    """Every kernel call covers only kv tokens of blocks in the table (empty blocks never touched)."""
    plan = plan_of(causal_window(64), heads=2, q_len=1024)
    prep = torch_exec.prepare(plan)
    table = plan.block_table()
    allowed_blocks = set()
    for r in range(table.num_q_blocks):
        for c in table.kv_indices[0, r, : table.kv_num_blocks[0, r]].tolist():
            allowed_blocks.add((r, c))
        for c in table.full_indices[0, r, : table.full_num_blocks[0, r]].tolist():
            allowed_blocks.add((r, c))
    touched = 0
    for grp in prep.units[0].groups:
        for r, idx in zip(grp.rows.tolist(), grp.kv_index):
            touched += idx.numel()
            assert {(r, c) for c in (idx // plan.block_kv).unique().tolist()} <= allowed_blocks
    # partial blocks are trimmed to allowed columns: fewer tokens than the visited blocks hold
    assert touched < int(table.visited().sum()) * plan.block_kv


def test_gqa_shares_kv_without_copies():
    plan = CASES["gqa_causal"]
    prep = torch_exec.prepare(plan)
    assert [u.q_heads.tolist() for u in prep.units] == [[[0, 1, 2], [3, 4, 5]]]
    _, k, _ = qkv(plan)
    ku = torch_exec._unit_kv(k, prep.units[0])
    assert ku.data_ptr() == k.data_ptr()


def test_plan_is_prepared_once():
    plan = CASES["window40_block32"]
    assert torch_exec.prepare(plan) is torch_exec.prepare(plan)


def test_executor_entry_point_dispatches_here():
    plan = CASES["per_head_programs"]
    q, k, v = qkv(plan)
    a = run(plan, q, k, v, executor="torch")[0]
    b = attend(plan, q, k, v)[0]
    assert torch.equal(a, b)


def test_dynamic_mask_is_refused():
    plan = plan_of(M.Selector("topk", (("k", 4),)), heads=2, q_len=128)
    q, k, v = qkv(plan)
    with pytest.raises(ValueError, match="selects blocks"):
        torch_exec.attention_torch_forward(plan, q, k, v)


def test_wrong_shapes_are_reported():
    plan = CASES["causal"]
    q, k, v = qkv(plan)
    with pytest.raises(ValueError, match=r"expects q of shape \[2, 4, 200, 16\]"):
        run(plan, q[:, :, :100], k, v, executor="torch")


@pytest.mark.parametrize("name", ["tile3d_gathered_gqa", "random_blocks_gathered_seq290"])
def test_gathered_rows_see_exactly_their_allowed_tokens(name):
    """A gathered call holds, per query block, exactly the kv slots some of its queries may see
    (padding columns masked), and every such block is in no other call."""
    plan = CASES[name]
    prep = torch_exec.prepare(plan)
    order = plan.order()
    allowed = plan.dense_mask()[0]
    if order is not None:
        allowed = allowed[order][:, order]
    bq = plan.block_q
    gathered = [g for g in prep.units[0].groups if g.gathered]
    assert gathered, "no query block was gathered"
    rows_elsewhere = {r for g in prep.units[0].groups if not g.gathered for r in g.rows.tolist()}
    for grp in gathered:
        bias = grp.bias.expand(1, len(grp.rows), -1, -1)[0] if grp.bias is not None else None
        for i, r in enumerate(grp.rows.tolist()):
            assert r not in rows_elsewhere
            want = allowed[r * bq : (r + 1) * bq].any(0).nonzero().flatten()
            live = torch.ones(grp.length, dtype=torch.bool) if bias is None else ~torch.isneginf(bias[i]).all(0)
            assert torch.equal(grp.kv_index[i][live], want)


def test_single_batch_units_write_the_result_in_place():
    """Batch 1 with several programs: each unit's output is a view of the result (no scatter)."""
    plan = plan_of(M.Causal(), sink_window(16, 64), head_to_program=(0, 0, 1, 1), q_len=257)
    prep = torch_exec.prepare(plan)
    assert [torch_exec._direct(u, plan.num_heads, 1) for u in prep.units] == [0, 2]
    q, k, v = qkv(plan, batch=1)
    out, lse = attend(plan, q, k, v)
    ref, ref_lse = attention_reference(plan, q, k, v)
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-5)
    assert_close_lse(lse, ref_lse)
    assert out.is_contiguous() and lse.is_contiguous()


@pytest.mark.parametrize("name", ["tile3d_gathered_gqa", "random_blocks_gathered_seq290"])
def test_gathered_calls_split_under_a_memory_cap(name, monkeypatch):
    """With a tiny cap on gathered K/V bytes every gathered call runs row by row: same results."""
    plan = CASES[name]
    monkeypatch.setattr(torch_exec, "GATHER_BYTES", 1)
    grp = next(g for g in torch_exec.prepare(plan).units[0].groups if g.kv_step is None and g.rows.numel() > 1)
    assert len(torch_exec._pieces(grp, 2, plan.head_dim, 4)) == grp.rows.numel()
    check_against_reference(plan)
