"""The generated kernels on a GPU (executor ``triton``): forward, backward, decode, block
selection and the compiled backend, against the exact dense reference.

This module imports nothing beyond torch and attncc, so the bare GPU machine collects it
(``bench/gpu.sh`` runs it alone). With ``ATTNCC_GPU_DRY_RUN=1`` the same tests run on CPU under
the Triton interpreter on small shapes: that is how ``bench/gpu.sh --dry-run`` checks the GPU
run end to end without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from support import LSE_ATOL, OUT_ATOL, inputs, make_plan

from attncc.codegen import executors
from attncc.codegen.backward.reference import attention_backward_reference
from attncc.codegen.forward.reference import attention_reference
from attncc.ir import masks as M
from attncc.ir.dtypes import DTYPES
from attncc.runtime.registry import register_plan
from attncc.spec import parse_mask

DRY = os.environ.get("ATTNCC_GPU_DRY_RUN") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not DRY else "cpu"
EXECUTOR = "triton" if DEVICE == "cuda" else "interpret"
#: sequence length: GPU-sized on a GPU, small under the interpreter
S = 1024 if DEVICE == "cuda" else 64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (HAS_CUDA or DRY), reason="needs an NVIDIA GPU (or ATTNCC_GPU_DRY_RUN=1)"),
]

SW = M.All((M.Causal(), M.Any_((M.Sink(4), M.Window(S // 4 - 1, 0)))))
PLANS = {
    "causal_d64_bf16": dict(programs=(M.Causal(),), dtype="bfloat16", head_dim=64),
    "sink_window_gqa_fp16": dict(programs=(SW,), dtype="float16", head_dim=64, heads=8, kv_heads=2),
    "per_head_d128_bf16": dict(
        programs=(M.Causal(), SW), dtype="bfloat16", head_dim=128, heads=4, head_to_program=(0, 1, 1, 0)
    ),
    "block_causal_mask_bool_fp32": dict(programs=(M.BlockCausal(S // 4),), dtype="float32", mask_kind="bool"),
}


def plan_of(name, **over):
    kw = dict(PLANS[name])
    programs = kw.pop("programs")
    kw.setdefault("heads", 4)
    return make_plan(*programs, **{"q_len": S, "block": 64 if DEVICE == "cuda" else 16, **kw, **over})


def model_mask(plan, batch):
    if plan.mask_kind is None:
        return None
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(batch, 1, plan.q_len, plan.kv_len, generator=g) > 0.1
    return keep.to(DEVICE)


@pytest.mark.parametrize("name", list(PLANS))
def test_forward(name):
    plan = plan_of(name)
    q, k, v, _ = inputs(plan, batch=2, device=DEVICE)
    mask = model_mask(plan, 2)
    out, lse = executors.run(plan, q, k, v, mask, executor=EXECUTOR)
    ref, ref_lse = attention_reference(plan, q, k, v, mask)
    torch.testing.assert_close(out.float(), ref.float(), atol=OUT_ATOL[plan.dtype] * 2, rtol=0)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=LSE_ATOL[plan.dtype] * 2, rtol=0)


@pytest.mark.parametrize("name", ["causal_d64_bf16", "sink_window_gqa_fp16", "block_causal_mask_bool_fp32"])
def test_backward(name):
    plan = plan_of(name)
    q, k, v, dout = inputs(plan, batch=1, device=DEVICE, grad=True)
    mask = model_mask(plan, 1)
    out, _ = torch.ops.attncc.attention(q, k, v, mask, None, None, register_plan(plan), EXECUTOR)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = attention_backward_reference(plan, q.detach(), k.detach(), v.detach(), dout, None, mask)
    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}[plan.dtype]
    for got, ref, what in zip(grads, want, "qkv"):
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=0, msg=lambda m, w=what: f"d{w}: {m}")


@pytest.mark.parametrize("q_len", [1, 4])
def test_decode_steps(q_len):
    """Few queries at the end of the keys: the split-KV kernel and its merge."""
    plan = plan_of("sink_window_gqa_fp16", q_len=q_len, kv_len=S + 37, q_offset=S + 37 - q_len)
    q, k, v, _ = inputs(plan, batch=2, device=DEVICE)
    out, lse = executors.run(plan, q, k, v, executor=EXECUTOR)
    ref, ref_lse = attention_reference(plan, q, k, v)
    torch.testing.assert_close(out.float(), ref.float(), atol=OUT_ATOL["float16"] * 2, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL["float16"] * 2, rtol=0)


def test_block_selection():
    """Top-k selection estimated by the Triton kernels, attention under it against the dense
    attention under the same selection."""
    from attncc.codegen.selectors.layout import dense_selected_mask

    topk = parse_mask({"all": ["causal", {"any": [{"sink": 16}, {"topk": {"k": 2, "block": 16}}]}]}, {})
    plan = make_plan(topk, heads=4, q_len=S, head_dim=64, block=16, dtype="float16")
    q, k, v, _ = inputs(plan, batch=1, device=DEVICE)
    selected = executors.select(plan, q, k, v, None, EXECUTOR)
    out, _ = executors.attend(plan, q, k, v, None, selected, EXECUTOR)
    allowed = dense_selected_mask(plan, selected.cpu()).to(DEVICE)
    g = plan.gqa_group
    kd, vd = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scores = (q.float() @ kd.transpose(-1, -2) * plan.scale).masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(scores, -1).nan_to_num(0.0) @ vd
    torch.testing.assert_close(out.float(), ref, atol=OUT_ATOL["float16"] * 2, rtol=0)


def test_compiled_backend_forward_and_backward():
    """torch.compile(backend="attncc") of a model's SDPA, default executor for the device, against
    the uncompiled model given the spec's mask explicitly, with gradients."""
    import attncc

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    spec = {"attncc": 1, "block_size": 64 if DEVICE == "cuda" else 16, "rules": [{"mask": {"window": S // 4}}]}
    dt = DTYPES["bfloat16"].torch if DEVICE == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, S, 64, generator=g).to(DEVICE, dt).requires_grad_(True)
    k = torch.randn(1, 2, S, 64, generator=g).to(DEVICE, dt).requires_grad_(True)
    v = torch.randn(1, 2, S, 64, generator=g).to(DEVICE, dt).requires_grad_(True)
    torch._dynamo.reset()
    options = {"spec": spec, "strict": True, "executor": "auto" if DEVICE == "cuda" else "interpret"}
    compiled = torch.compile(Attn(), backend="attncc", options=options)
    out = compiled(q, k, v)
    allowed = attncc.dense_mask(spec, S).to(DEVICE) & torch.ones(S, S, dtype=torch.bool, device=DEVICE).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    tol = 3e-2 if dt == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=0)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    ref = torch.autograd.grad(want.float().sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 4, rtol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_forward_launch_is_cuda_graph_capturable():
    """The steady-state forward launch allocates nothing but its outputs and never syncs: it can
    be captured into a CUDA graph, and the replay equals the eager call."""
    from attncc.codegen.forward.launch import attention_fwd

    plan = plan_of("sink_window_gqa_fp16")
    q, k, v, _ = inputs(plan, device=DEVICE)
    out, lse = attention_fwd(plan, q, k, v)  # compile, tables and launch arguments prepared
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    got_out, got_lse = torch.empty_like(out), torch.empty_like(lse)
    with torch.cuda.graph(graph):
        attention_fwd(plan, q, k, v, out=got_out, lse=got_lse)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got_out, out, atol=0, rtol=0)
    torch.testing.assert_close(got_lse, lse, atol=0, rtol=0)
