"""Backward pass: dQ/dK/dV of the generated Triton kernels (interpreter) and the block-sparse torch
path against autograd through the dense reference; gradcheck of the reference in float64.

Tolerances (absolute and relative, against the fp32 reference computed from the same inputs):
fp32 1e-4; fp16 2e-2 and bf16 6e-2, dominated by ``out`` being stored in the low precision
(delta = rowsum(dout * out)) and the gradients being rounded to it.
"""

from __future__ import annotations

import pytest
import torch
from attncc.codegen.backward import (
    attention,
    attention_backward,
    write_backward_kernels,
)
from attncc.codegen.backward_gen import backward_source, kernel_names
from attncc.codegen.reference import attention_reference

from attncc import masks as M
from attncc.permute import TilePermutation
from attncc.plan import AttentionPlan

CAUSAL = M.Causal()
STREAMING = M.conj(CAUSAL, M.Any_((M.Sink(4), M.Window(15, 0))))

#: mask family -> (mask, extra plan fields)
FAMILIES = {
    "full": (M.Full(), {}),
    "causal": (CAUSAL, {}),
    "window": (M.Window(20, 5), {}),
    "sink_window": (STREAMING, {}),
    "chunk": (M.Chunk(24), {}),
    "block_causal": (M.BlockCausal(20), {}),
    "strided": (M.conj(CAUSAL, M.Strided(5)), {}),
    "global": (M.Any_((M.Global(6), M.Window(8, 8))), {}),
    "prefix": (M.Any_((M.Prefix(10), CAUSAL)), {}),
    "power": (M.Power(4), {}),
    "not_chunk": (M.conj(CAUSAL, M.Not(M.Chunk(16))), {}),
    "random_blocks": (M.conj(CAUSAL, M.RandomBlocks(2, 3, 16)), {}),
    "tile3d_permute": (
        M.Tile3D((4, 4, 4), (1, 1, 1)),
        {"permute": TilePermutation((4, 4, 4), (2, 2, 2)), "q_len": 64, "kv_len": 64},
    ),
}


def make_plan(
    programs,
    head_to_program=None,
    *,
    num_heads=2,
    num_kv_heads=1,
    q_len=63,
    kv_len=None,
    head_dim=32,
    head_dim_v=None,
    dtype="float32",
    block=16,
    permute=None,
    mask_kind=None,
    q_offset=0,
) -> AttentionPlan:
    programs = tuple(programs) if isinstance(programs, (tuple, list)) else (programs,)
    kv_len = q_len if kv_len is None else kv_len
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    return AttentionPlan(
        programs=programs,
        head_to_program=head_to_program or (0,) * num_heads,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        dtype=dtype,
        scale=head_dim**-0.5,
        block_q=block,
        block_kv=block,
        permute=permute,
        mask_kind=mask_kind,
        q_offset=q_offset,
    )


def inputs(plan: AttentionPlan, batch=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, plan.num_heads, plan.q_len, plan.head_dim, generator=g).to(dtype)
    k = torch.randn(batch, plan.num_kv_heads, plan.kv_len, plan.head_dim, generator=g).to(dtype)
    v = torch.randn(batch, plan.num_kv_heads, plan.kv_len, plan.head_dim_v, generator=g).to(dtype)
    dout = torch.randn(batch, plan.num_heads, plan.q_len, plan.head_dim_v, generator=g).to(dtype)
    return q, k, v, dout


def nonempty_blocks(plan: AttentionPlan) -> torch.Tensor:
    """[H, nq, nk] int32: 1 where the dense mask allows some pair of the block (kernel order)."""
    dense = plan.dense_mask()
    order = plan.order()
    if order is not None:
        dense = dense[:, order][:, :, order]
    nq, nk = -(-plan.q_len // plan.block_q), -(-plan.kv_len // plan.block_kv)
    pad = torch.zeros(plan.num_heads, nq * plan.block_q, nk * plan.block_kv, dtype=torch.bool)
    pad[:, : plan.q_len, : plan.kv_len] = dense
    return pad.view(plan.num_heads, nq, plan.block_q, nk, plan.block_kv).any(4).any(2).int()


def check_grads(plan, got, want, atol, rtol):
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype, name
        assert not a.isnan().any(), f"{name} has unwritten (NaN) elements"
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def run_case(plan, executor, *, batch=1, dtype=torch.float32, mask_tensor=None, atol=1e-4, rtol=1e-4):
    q, k, v, dout = inputs(plan, batch, dtype)
    out, lse = attention_reference(plan, q, k, v, mask_tensor)
    want = attention_backward(plan, q, k, v, out, lse, dout, mask_tensor, "reference")
    nan_grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    visits = {} if executor == "interpret" else None
    got = attention_backward(plan, q, k, v, out, lse, dout, mask_tensor, executor, grads=nan_grads, visits=visits)
    assert all(a is b for a, b in zip(got, nan_grads)), "grads buffers must be written in place"
    check_grads(plan, got, want, atol, rtol)
    if visits is not None:
        expect = nonempty_blocks(plan).unsqueeze(0).expand(batch, -1, -1, -1)
        # every non-empty block exactly once, never an empty one, in both kernels
        assert torch.equal(visits["dq"], expect)
        assert torch.equal(visits["dkdv"], expect)
    return got


EXECUTORS = ["interpret", "torch"]


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mask_families(family, executor):
    mask, extra = FAMILIES[family]
    run_case(make_plan(mask, **extra), executor)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_head_policies_with_gqa(executor):
    # a kv head is shared by query heads under different programs: dK/dV sum across programs
    plan = make_plan((CAUSAL, M.Window(8, 0), M.Chunk(16)), (0, 1, 2, 0), num_heads=4, num_kv_heads=2)
    run_case(plan, executor, batch=2)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_gqa_group_of_four(executor):
    run_case(make_plan(STREAMING, num_heads=4, num_kv_heads=1, block=32), executor)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_bool_mask_tensor_with_empty_rows(executor):
    plan = make_plan(CAUSAL, mask_kind="bool")
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, plan.q_len, plan.kv_len, generator=g) > 0.3
    mask[:, :, 5] = False  # rows with no key: zero output, zero gradient
    grads = run_case(plan, executor, batch=2, mask_tensor=mask)
    assert torch.equal(grads[0][:, :, 5], torch.zeros_like(grads[0][:, :, 5]))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_additive_padding_mask(executor):
    plan = make_plan(STREAMING, num_heads=2, num_kv_heads=2, mask_kind="additive")
    mask = torch.zeros(2, 1, 1, plan.kv_len)
    mask[0, ..., 50:] = float("-inf")  # padded keys of sample 0
    mask[1, ..., :3] = -2.5  # a soft bias
    run_case(plan, executor, batch=2, mask_tensor=mask)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize(
    "q_len,kv_len,q_offset", [(40, 72, 32), (72, 40, 0), (17, 100, 83)], ids=["chunked_prefill", "q_longer", "decode17"]
)
def test_q_len_differs_from_kv_len(q_len, kv_len, q_offset, executor):
    plan = make_plan(STREAMING, q_len=q_len, kv_len=kv_len, q_offset=q_offset, block=32)
    run_case(plan, executor)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("head_dim,head_dim_v", [(16, 16), (80, 48)], ids=["d16", "d80_dv48"])
def test_head_dims(head_dim, head_dim_v, executor):
    plan = make_plan(CAUSAL, head_dim=head_dim, head_dim_v=head_dim_v, q_len=50)
    run_case(plan, executor)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)], ids=["fp16", "bf16"])
def test_low_precision(dtype, tol, executor):
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    plan = make_plan(STREAMING, dtype=name, num_heads=4, num_kv_heads=2)
    run_case(plan, executor, dtype=dtype, atol=tol, rtol=tol)


def test_autograd_function_matches_reference():
    plan = make_plan(STREAMING, num_heads=2, num_kv_heads=1, q_len=33)
    q, k, v, dout = inputs(plan)
    grads = []
    for executor in ("reference", "torch", "interpret"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        attention(plan, *leaves, executor=executor).backward(dout)
        grads.append([t.grad for t in leaves])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


GRADCHECK_MASKS = {
    "full": M.Full(),
    "causal": CAUSAL,
    "window": M.Window(2, 1),
    "sink": M.Sink(3),
    "prefix": M.Prefix(4),
    "global": M.Global(2),
    "chunk": M.Chunk(5),
    "block_causal": M.BlockCausal(4),
    "strided": M.Strided(3),
    "power": M.Power(2),
    "random_blocks": M.RandomBlocks(1, 7, 4),
    "tile3d": M.Tile3D((2, 2, 3), (0, 1, 1)),
    "all": M.All((CAUSAL, M.Window(3, 0))),
    "any": M.Any_((M.Sink(2), M.Window(1, 0))),
    "not": M.Not(CAUSAL),  # the last query row sees no key: zero gradient
}


@pytest.mark.parametrize("family", list(GRADCHECK_MASKS))
def test_gradcheck_reference_float64(family):
    plan = make_plan(
        GRADCHECK_MASKS[family], num_heads=2, num_kv_heads=1, q_len=12, head_dim=4, dtype="float64", block=4
    )
    q, k, v, _ = inputs(plan, dtype=torch.float64)
    leaves = tuple(t.requires_grad_(True) for t in (q, k, v))
    # fast mode checks random projections of the Jacobian: the same test at a fraction of the calls
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(plan, a, b, c, executor="reference"), leaves, fast_mode=True
    )


def test_gradcheck_reference_additive_mask_gets_no_gradient():
    plan = make_plan(
        CAUSAL, num_heads=2, num_kv_heads=2, q_len=10, head_dim=4, dtype="float64", block=4, mask_kind="additive"
    )
    q, k, v, _ = inputs(plan, dtype=torch.float64)
    bias = torch.randn(1, 2, 10, 10, dtype=torch.float64, requires_grad=True)
    leaves = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(plan, a, b, c, bias, executor="reference"), leaves, fast_mode=True
    )
    attention(plan, *leaves, bias, executor="reference").sum().backward()
    assert bias.grad is None


def test_generated_source_names_and_predicate():
    plan = make_plan((STREAMING, M.Chunk(16)), (0, 1))
    src = backward_source(plan)
    names = kernel_names(plan)
    assert names["dkdv"] == f"{plan.pattern}_bwd_dkdv_kernel"
    assert names["dq"] == f"{plan.pattern}_bwd_dq_kernel"
    for n in names.values():
        assert f"def {n}(" in src
    # each program's predicate is in the source, and only partial blocks evaluate it
    assert STREAMING.triton() in src and M.Chunk(16).triton() in src
    assert "APPLY_MASK: tl.constexpr" in src and "if APPLY_MASK:" in src


def test_rejects_cpu_tensors_for_compiled_triton():
    plan = make_plan(CAUSAL)
    q, k, v, dout = inputs(plan)
    out, lse = attention_reference(plan, q, k, v)
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        attention_backward(plan, q, k, v, out, lse, dout, None, "triton")


def test_rejects_wrong_shapes():
    plan = make_plan(CAUSAL)
    q, k, v, dout = inputs(plan)
    out, lse = attention_reference(plan, q, k, v)
    with pytest.raises(ValueError, match=r"dout has shape \[1, 2, 62, 32\], the plan expects \[1, 2, 63, 32\]"):
        attention_backward(plan, q, k, v, out, lse, dout[:, :, :62], None, "torch")


def test_rejects_dynamic_selector():
    plan = make_plan(M.Selector("topk", (("k", 2),)))
    q, k, v, dout = inputs(plan)
    out = torch.zeros_like(dout)
    lse = torch.zeros(1, 2, 63)
    with pytest.raises(M.MaskError, match="selects blocks"):
        attention_backward(plan, q, k, v, out, lse, dout, None, "interpret")


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_reference_gradient_equals_autograd_of_the_oracle(mask_kind):
    plan = make_plan(STREAMING, num_heads=4, num_kv_heads=2, q_len=30, mask_kind=mask_kind)
    q, k, v, dout = inputs(plan, batch=2)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 30, 30, generator=torch.Generator().manual_seed(2)) > 0.4
        mask[:, :, 3] = False
    elif mask_kind == "additive":
        mask = torch.randn(1, 4, 30, 30, generator=torch.Generator().manual_seed(2))
        mask[..., 7, :] = float("-inf")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attention_reference(plan, *leaves, mask)
    want = torch.autograd.grad(out, leaves, dout)
    got = attention_backward(plan, q, k, v, out.detach(), lse, dout, mask, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dump_compiles_backward_kernels_for_sm90(tmp_path):
    # the Triton compiler (not the interpreter) accepts every branch: head policies, GQA,
    # an additive mask tensor, a ragged sequence end and fp16 dots
    plan = make_plan(
        (STREAMING, M.Chunk(32)),
        (0, 1, 1, 0),
        num_heads=4,
        num_kv_heads=2,
        q_len=100,
        head_dim=64,
        dtype="float16",
        block=64,
        mask_kind="additive",
    )
    (entry,) = write_backward_kernels(tmp_path, [plan, plan], archs=(90,))
    assert (tmp_path / entry["file"]).read_text() == backward_source(plan)
    targets = entry["targets"]["sm_90"]
    for name in kernel_names(plan).values():
        assert "error" not in targets[name], targets[name]["error"]
        ptx = (tmp_path / targets[name]["files"]["ptx"]).read_text()
        assert ".target sm_90" in ptx and f".entry {name}" in ptx
