"""Backward pass: dQ/dK/dV of the generated Triton kernels (interpreter) and the block-sparse torch
path against autograd through the dense reference; gradcheck of the reference in float64.

Tolerances (absolute and relative, against the fp32 reference computed from the same inputs):
fp32 1e-4; fp16 2e-2 and bf16 6e-2, dominated by ``out`` being stored in the low precision
(delta = rowsum(dout * out)) and the gradients being rounded to it.
"""

from __future__ import annotations

import mask_cases
import pytest
import torch
from support import inputs, make_plan, nonempty_blocks

from attncc.codegen.backward.generate import backward_source, kernel_names
from attncc.codegen.backward.launch import attention_bwd, write_backward_kernels
from attncc.codegen.executors import run_backward
from attncc.codegen.forward.reference import attention_reference
from attncc.ir import masks as M
from attncc.ir.permute import TilePermutation
from attncc.ir.plan import AttentionPlan
from attncc.runtime.ops import attention

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


def plan_of(*programs, **kw) -> AttentionPlan:
    """A backward-test plan: 2 query heads on 1 kv head, 63 tokens (a ragged last block)."""
    return make_plan(*programs, **{"kv_heads": 1, "q_len": 63, **kw})


def check_grads(plan, got, want, atol, rtol):
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype, name
        assert not a.isnan().any(), f"{name} has unwritten (NaN) elements"
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def run_case(plan, executor, *, batch=1, mask_tensor=None, atol=1e-4, rtol=1e-4):
    q, k, v, dout = inputs(plan, batch)
    out, lse = attention_reference(plan, q, k, v, mask_tensor)
    want = run_backward(plan, q, k, v, out, lse, dout, None, mask_tensor, "reference")
    if executor != "interpret":
        got = run_backward(plan, q, k, v, out, lse, dout, None, mask_tensor, executor)
        check_grads(plan, got, want, atol, rtol)
        return got
    nan_grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    visits: dict = {}
    got = attention_bwd(plan, q, k, v, out, lse, dout, mask_tensor, target="interpret", grads=nan_grads, visits=visits)
    assert all(a is b for a, b in zip(got, nan_grads)), "grads buffers must be written in place"
    check_grads(plan, got, want, atol, rtol)
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
    run_case(plan_of(mask, **extra), executor)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_head_policies_with_gqa(executor):
    # a kv head is shared by query heads under different programs: dK/dV sum across programs
    plan = plan_of(CAUSAL, M.Window(8, 0), M.Chunk(16), head_to_program=(0, 1, 2, 0), heads=4, kv_heads=2)
    run_case(plan, executor, batch=2)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_gqa_group_of_four(executor):
    run_case(plan_of(STREAMING, heads=4, kv_heads=1, block=32), executor)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_bool_mask_tensor_with_empty_rows(executor):
    plan = plan_of(CAUSAL, mask_kind="bool")
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, plan.q_len, plan.kv_len, generator=g) > 0.3
    mask[:, :, 5] = False  # rows with no key: zero output, zero gradient
    grads = run_case(plan, executor, batch=2, mask_tensor=mask)
    assert torch.equal(grads[0][:, :, 5], torch.zeros_like(grads[0][:, :, 5]))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_additive_padding_mask(executor):
    plan = plan_of(STREAMING, heads=2, kv_heads=2, mask_kind="additive")
    mask = torch.zeros(2, 1, 1, plan.kv_len)
    mask[0, ..., 50:] = float("-inf")  # padded keys of sample 0
    mask[1, ..., :3] = -2.5  # a soft bias
    run_case(plan, executor, batch=2, mask_tensor=mask)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize(
    "q_len,kv_len,q_offset", [(40, 72, 32), (72, 40, 0), (17, 100, 83)], ids=["chunked_prefill", "q_longer", "decode17"]
)
def test_q_len_differs_from_kv_len(q_len, kv_len, q_offset, executor):
    plan = plan_of(STREAMING, q_len=q_len, kv_len=kv_len, q_offset=q_offset, block=32)
    run_case(plan, executor)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("head_dim,head_dim_v", [(16, 16), (80, 48)], ids=["d16", "d80_dv48"])
def test_head_dims(head_dim, head_dim_v, executor):
    plan = plan_of(CAUSAL, head_dim=head_dim, head_dim_v=head_dim_v, q_len=50)
    run_case(plan, executor)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 6e-2)], ids=["fp16", "bf16"])
def test_low_precision(dtype, tol, executor):
    plan = plan_of(STREAMING, dtype=dtype, heads=4, kv_heads=2)
    run_case(plan, executor, atol=tol, rtol=tol)


def test_op_gradients_match_across_executors():
    plan = plan_of(STREAMING, q_len=33)
    q, k, v, dout = inputs(plan)
    grads = []
    for executor in ("reference", "torch", "interpret"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        attention(plan, *leaves, executor=executor).backward(dout)
        grads.append([t.grad for t in leaves])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", mask_cases.params(mask_cases.static_cases()))
def test_gradcheck_reference_float64(case):
    # 12 tokens (a 2 x 2 x 3 grid) in blocks of 4: every case has partial, full and empty blocks
    plan = plan_of(mask_cases.mask(case, 12), q_len=12, head_dim=4, dtype="float64", block=4)
    q, k, v, _ = inputs(plan, grad=True)
    # fast mode checks random projections of the Jacobian: the same test at a fraction of the calls
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(plan, a, b, c, executor="reference"), (q, k, v), fast_mode=True
    )


def test_gradcheck_reference_additive_mask_gets_no_gradient():
    plan = plan_of(CAUSAL, kv_heads=2, q_len=10, head_dim=4, dtype="float64", block=4, mask_kind="additive")
    q, k, v, _ = inputs(plan)
    bias = torch.randn(1, 2, 10, 10, dtype=torch.float64, requires_grad=True)
    leaves = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(plan, a, b, c, bias, executor="reference"), leaves, fast_mode=True
    )
    attention(plan, *leaves, bias, executor="reference").sum().backward()
    assert bias.grad is None


def test_generated_source_names_and_predicate():
    plan = plan_of(STREAMING, M.Chunk(16))
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
    plan = plan_of(CAUSAL)
    q, k, v, dout = inputs(plan)
    out, lse = attention_reference(plan, q, k, v)
    with pytest.raises(ValueError, match="executor 'triton' runs on CUDA tensors"):
        run_backward(plan, q, k, v, out, lse, dout, None, None, "triton")


def test_rejects_wrong_shapes():
    plan = plan_of(CAUSAL)
    q, k, v, dout = inputs(plan)
    out, lse = attention_reference(plan, q, k, v)
    with pytest.raises(ValueError, match=r"dout has shape \[1, 2, 62, 32\], the plan expects \[1, 2, 63, 32\]"):
        run_backward(plan, q, k, v, out, lse, dout[:, :, :62], None, None, "torch")


def test_rejects_dynamic_selector():
    plan = plan_of(M.Selector("topk", (("k", 2),)))
    q, k, v, dout = inputs(plan)
    out = torch.zeros_like(dout)
    lse = torch.zeros(1, 2, 63)
    with pytest.raises(ValueError, match="data-dependent block selection has no backward"):
        run_backward(plan, q, k, v, out, lse, dout, None, None, "interpret")


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_reference_gradient_equals_autograd_of_the_oracle(mask_kind):
    plan = plan_of(STREAMING, heads=4, kv_heads=2, q_len=30, mask_kind=mask_kind)
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
    got = run_backward(plan, q, k, v, out.detach(), lse, dout, None, mask, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dump_compiles_backward_kernels_for_sm90(tmp_path):
    # the Triton compiler (not the interpreter) accepts every branch: head policies, GQA,
    # an additive mask tensor, a ragged sequence end and fp16 dots
    plan = plan_of(
        STREAMING,
        M.Chunk(32),
        head_to_program=(0, 1, 1, 0),
        heads=4,
        kv_heads=2,
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
