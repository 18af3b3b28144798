"""Run-time key order (PBS-Attn) on the generated forward kernel, under the Triton interpreter:
k/v gathered through a per-(batch, kv head) order argument, queries in model order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attncc.codegen.forward.generate import generate_forward
from attncc.codegen.forward.launch import attention_fwd
from attncc.codegen.selectors import layout as SL
from attncc.codegen.selectors import reference as SR
from attncc.codegen.selectors import run as S
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan


def pbs_plan(length: int, heads: int = 4, kv_heads: int = 2, mask_kind=None) -> AttentionPlan:
    sel = M.Selector("threshold", (("tau", 0.7),))
    prog = M.All((M.Causal(), M.Any_((M.Window(15, 0), sel))))
    return AttentionPlan(
        (prog,), (0,) * heads, heads, kv_heads, length, length, 16, 16, "float32", 0.25, 16, 16,
        mask_kind=mask_kind, rule="pbs",
    )  # fmt: skip


@pytest.mark.parametrize(
    "length, segment, mask_kind",
    [(64, 32, None), (77, 32, "bool"), (77, 48, None)],
    ids=["64_seg32", "77_seg32_bool_mask", "77_seg48_short_last_segment"],
)
def test_interpreter_equals_reference_with_the_selected_mask_mapped_back(length, segment, mask_kind):
    plan = pbs_plan(length, mask_kind=mask_kind)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, length, 16, generator=g)
    k, v = torch.randn(2, 2, 2, length, 16, generator=g)
    mask = None if mask_kind is None else torch.rand(2, 1, length, length, generator=g) > 0.2
    out, lse = S.run_permuted(plan, q, k, v, mask, segment, "interpret")
    order = SR.key_order(q, k, segment)
    assert not torch.equal(order, torch.arange(length).expand_as(order)), "the order must permute something"
    allowed = SR.dense_permuted_mask(plan, SR.select_permuted(plan, q, k, order), order)
    want, want_lse = S._attend_dense(plan, q, k, v, mask, allowed)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=0)
    # the order matters: the same kernels without it (model order) give another result
    model_order = S.attend(plan, q, k, v, mask, SR.select_permuted(plan, q, k, order), "interpret")[0]
    assert not torch.allclose(model_order, want, atol=1e-3)


def test_segment_labels_are_conservative_over_each_run():
    labels = torch.tensor([[[2, 2, 0, 0, 1], [2, 0, 0, 0, 2]]], dtype=torch.int8)
    got = SL._segment_labels(labels, 2)
    assert got.tolist() == [[[2, 2, 0, 0, 1], [1, 1, 0, 0, 2]]]


def test_only_kernels_with_a_runtime_key_order_take_the_argument():
    plan = pbs_plan(64)
    static = SL.layout(plan).plan_sel
    keyed = SL.permuted_layout(plan, 32).plan_sel
    assert "KvOrder" not in generate_forward(static)
    src = generate_forward(keyed)
    assert "Order, KvOrder," in src and "kv_order = KvOrder + (off_b * (H // GROUP) + off_hkv) * KV_LEN" in src
    assert static.key() != keyed.key() and "run-time order" in keyed.describe()


def test_kv_order_argument_is_checked():
    plan = pbs_plan(32)
    lay = SL.permuted_layout(plan, 32)
    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    order = torch.arange(32).expand(1, 2, 32).contiguous()
    table = lay.plan_sel.block_table()
    with pytest.raises(ValueError, match="kv_order is missing"):
        attention_fwd(lay.plan_sel, q, k, v, block_table=table)
    with pytest.raises(ValueError, match="kv_order is given"):
        attention_fwd(SL.layout(plan).plan_sel, q, k, v, block_table=table, kv_order=order)
    with pytest.raises(ValueError, match=r"expected int64 \(1, 2, 32\)"):
        attention_fwd(lay.plan_sel, q, k, v, block_table=table, kv_order=order.int())
    with pytest.raises(ValueError, match="needs block_table"):
        attention_fwd(lay.plan_sel, q, k, v, kv_order=order)
    with pytest.raises(ValueError, match="static permutation or a run-time key order"):
        from attncc.ir.permute import TilePermutation

        dataclasses.replace(lay.plan_sel, permute=TilePermutation((2, 16), (1, 16)))


@pytest.mark.slow
def test_kernel_with_a_runtime_key_order_compiles_for_sm90(tmp_path):
    from attncc.codegen.forward.launch import compile_plans

    plan = dataclasses.replace(pbs_plan(256, mask_kind="bool"), dtype="bfloat16", block_q=64, block_kv=64)
    keyed = SL.permuted_layout(plan, 128).plan_sel
    (result,) = compile_plans([keyed], tmp_path, archs=(90,))[0]
    assert "error" not in result, result["error"]
    assert (tmp_path / result["files"]["ptx"]).read_text().startswith("//")
