"""Ahead-of-time compiles are those of the kernels that run: the JIT's own specialisation of a
real launch's arguments, and what they cost on Hopper at the benchmark shapes."""

from __future__ import annotations

import pathlib
import re

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
    assert job.attrs["stride_qs"] == [["tt.divisibility", 16]]
    # lengths are run-time ints the JIT does not specialise on (a new length does not recompile)
    assert job.signature["Q_LEN"] == "i32" and "Q_LEN" not in job.attrs
    # the sm_90 table's tiles for d128 16-bit, not the plan's 64 x 64 sparsity block
    assert (job.constexprs["BLOCK_M"], job.constexprs["BLOCK_N"], job.num_warps, job.num_stages) == (128, 64, 8, 3)
    assert "B=1 H=8" in job.specialised_for


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,dtype", [(64, "float16"), (128, "bfloat16")])
def test_kernels_at_benchmark_shapes_fit_hopper(tmp_path, head_dim, dtype):
    """Forward, dQ, dK/dV and decode kernels on the sm_90 table's tiles: no stack, fewer than 255
    registers, wgmma for the GEMMs."""
    plan = AttentionPlan.of(SINK_WINDOW, num_heads=8, q_len=4096, head_dim=head_dim, block=64, dtype=dtype)
    jobs = [j for make in (forward_aot_jobs, backward_aot_jobs, decode_aot_jobs) for j in make(plan, 90, tmp_path)]
    results = {j.kernel: r for j, r in zip(jobs, compile_jobs(jobs, workers=2))}
    for name, r in results.items():
        assert "error" not in r, f"{name}: {r['error']}"
        ptx = pathlib.Path(r["files"]["ptx"]).read_text()
        if not name.endswith("_preprocess_kernel"):
            assert r["stack_bytes"] == 0 and r["num_regs"] < 255, (name, r)
        if name.endswith(("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")):
            assert ptx.count("wgmma.mma_async") >= 2, f"{name}: fewer than two wgmma GEMMs"
        if name.endswith("_fwd_kernel"):
            # both walks (full, partial blocks) keep loads in flight while a step computes: their
            # waits leave >= 1 async copy group pending (the block index is loaded a step ahead)
            ttgir = pathlib.Path(r["files"]["ttgir"]).read_text()
            assert len(re.findall(r"async_wait[^\n]*\{num = [1-9]", ttgir)) >= 2, f"{name}: a walk waits for all loads"


@pytest.mark.slow
def test_every_table_entry_compiles_without_spills(tmp_path):
    """Every default of codegen/configs.py's forward and backward tables, compiled for its
    architecture as the JIT builds it at its head-dim class: no stack (a spill fails here)."""
    from attncc.codegen import configs as C

    jobs = []
    # one folder per entry: the kernels of one plan share file names
    for i, ((arch_class, dtype_class, d), cfg) in enumerate(C.FORWARD.items()):
        arch = {"sm90": 90, "sm80": 80}[arch_class]
        dtype = "float32" if dtype_class == "fp32" else "bfloat16"
        plan = AttentionPlan.of(SINK_WINDOW, num_heads=4, q_len=2048, head_dim=d, dtype=dtype)
        jobs += [
            (f"fwd {arch_class} {dtype} d{d} {cfg.text()}", j) for j in forward_aot_jobs(plan, arch, tmp_path / f"f{i}")
        ]
    backward = [(k, v) for k, v in C.BACKWARD.items()] + [(("sm90", "fp32", d), v) for d, v in C.BACKWARD_FP32.items()]
    for i, ((arch_class, dtype_class, d), cfg) in enumerate(backward):
        arch = {"sm90": 90, "sm80": 80}[arch_class]
        dtype = "float32" if dtype_class == "fp32" else "float16"
        plan = AttentionPlan.of(SINK_WINDOW, num_heads=4, q_len=2048, head_dim=d, dtype=dtype)
        assert C.backward_config(plan, arch) == cfg
        what = f"bwd {arch_class} {dtype} d{d}"
        jobs += [(what, j) for j in backward_aot_jobs(plan, arch, tmp_path / f"b{i}") if "preprocess" not in j.kernel]
    results = compile_jobs([j for _, j in jobs], workers=2)
    spills = [f"{what} {j.kernel}: {r.get('error') or r['stack_bytes']}" for (what, j), r in zip(jobs, results)]
    spills = [s for s, r in zip(spills, results) if "error" in r or r["stack_bytes"]]
    assert not spills, "\n".join(spills)


@pytest.mark.slow
@pytest.mark.parametrize(
    "what,fields",
    [
        ("softcap_alibi", {"score_mod": None}),
        ("documents", {"mask_kind": "documents"}),
    ],
)
def test_score_mods_and_documents_compile_for_hopper(tmp_path, what, fields):
    """The kernels of the model's additions (soft-capping + ALiBi in the scores, packed documents'
    ids in the blocks) compile for sm_90 as the JIT builds them, forward and backward, without
    spills: the interpreter runs Python, so only a real compile shows the Triton is valid."""
    from attncc.ir.score_mod import ScoreMod

    if what == "softcap_alibi":
        fields = {"score_mod": ScoreMod(softcap=50.0, alibi=tuple(2.0 ** -(h + 1) for h in range(8)))}
    plan = AttentionPlan.of(
        SINK_WINDOW, num_heads=8, num_kv_heads=2, q_len=4096, head_dim=128, block=64, dtype="bfloat16", **fields
    )
    makers = (forward_aot_jobs, backward_aot_jobs) + ((decode_aot_jobs,) if what != "documents" else ())
    jobs = [j for make in makers for j in make(plan, 90, tmp_path)]
    assert jobs
    results = {j.kernel: r for j, r in zip(jobs, compile_jobs(jobs, workers=2))}
    for name, r in results.items():
        assert "error" not in r, f"{name}: {r['error']}"
        assert what in name or "preprocess" in name, name
        if not name.endswith("_preprocess_kernel"):
            assert r["stack_bytes"] == 0 and r["num_regs"] <= 255, (name, r)
