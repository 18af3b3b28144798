"""Ahead-of-time compiles are those of the kernels that run: the JIT's own specialisation of a
real launch's arguments, and what they cost on Hopper at the benchmark shapes."""

from __future__ import annotations

import pathlib

import pytest

from attncc.codegen.aot import compile_jobs
from attncc.codegen.backward.launch import backward_aot_jobs
from attncc.codegen.decode.launch import decode_aot_jobs
from attncc.codegen.forward.launch import forward_aot_jobs
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan

SINK_WINDOW = M.All((M.Causal(), M.Any_((M.Sink(64), M.Window(511, 0)))))


def test_jobs_carry_the_jit_specialisation(tmp_path):
    """Unit strides become constants and 16-divisible integers and aligned pointers carry
    divisibility attributes, as Triton's JIT derives them from the launch arguments."""
    plan = AttentionPlan.of(SINK_WINDOW, num_heads=8, q_len=4096, head_dim=128, block=64, dtype="bfloat16")
    (job,) = forward_aot_jobs(plan, 90, tmp_path)
    assert job.constexprs["stride_qd"] == 1 and job.signature["stride_qd"] == "constexpr"
    assert job.signature["Q"] == "*bf16" and job.attrs["Q"] == [["tt.divisibility", 16]]
    assert job.attrs["stride_qs"] == [["tt.divisibility", 16]] and job.attrs["Q_LEN"] == [["tt.divisibility", 16]]
    assert "B=1 H=8" in job.specialised_for


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,dtype", [(64, "float16"), (128, "bfloat16")])
def test_kernels_at_benchmark_shapes_fit_hopper(tmp_path, head_dim, dtype):
    """Forward, dQ and decode kernels: no stack, fewer than 255 registers, wgmma for both GEMMs
    (sm_90). The dK/dV kernel is held to what it is today (see launch_options): at most 16 bytes
    of stack, so a change that spills more fails here."""
    plan = AttentionPlan.of(SINK_WINDOW, num_heads=8, q_len=4096, head_dim=head_dim, block=64, dtype=dtype)
    jobs = [j for make in (forward_aot_jobs, backward_aot_jobs, decode_aot_jobs) for j in make(plan, 90, tmp_path)]
    results = {j.kernel: r for j, r in zip(jobs, compile_jobs(jobs, workers=2))}
    for name, r in results.items():
        assert "error" not in r, f"{name}: {r['error']}"
        ptx = pathlib.Path(r["files"]["ptx"]).read_text()
        if name.endswith(("_fwd_kernel", "_bwd_dq_kernel", "_decode_kernel")):
            assert r["stack_bytes"] == 0 and r["num_regs"] < 255, (name, r)
        if name.endswith(("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")):
            assert ptx.count("wgmma.mma_async") >= 2, f"{name}: fewer than two wgmma GEMMs"
        if name.endswith("_bwd_dkdv_kernel"):
            assert r["stack_bytes"] <= 16, (name, r)
