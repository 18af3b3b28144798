"""Generated forward kernels equal the dense reference (Triton interpreter on CPU, ``triton`` on
CUDA), visit exactly the non-empty blocks, are cached, snapshotted and compile for sm_90.

Tolerances against the fp32 reference: fp32 atol 1e-5; fp16 atol 2e-3 and bf16 atol 1.6e-2 on
the output (about two ulps of the output dtype near 1: the kernel accumulates in fp32 and rounds
once on store; on GPUs P is rounded to the input dtype before P @ V, hence the ulp margin);
lse is fp32 in every case (atol 1e-5, 1e-3 for fp16/bf16 inputs).
"""

from __future__ import annotations

import json
import os
import pathlib

import mask_cases
import pytest
import torch
from support import LSE_ATOL, OUT_ATOL, inputs, make_plan, nonempty_blocks

from attncc.cli import main
from attncc.codegen.cache import KernelCache
from attncc.codegen.dump import write_kernels
from attncc.codegen.executors import run
from attncc.codegen.forward.generate import CodegenError, emit_mask_predicate, generate_forward, kernel_name
from attncc.codegen.forward.launch import attention_fwd, compile_plans
from attncc.codegen.forward.reference import attention_reference
from attncc.ir import masks as M
from attncc.ir.dtypes import DTYPES
from attncc.ir.permute import TilePermutation
from attncc.ir.plan import AttentionPlan
from attncc.spec import parse_mask

GOLDEN = pathlib.Path(__file__).parent / "golden"
HAS_CUDA = torch.cuda.is_available()

#: every plan a test below ran, compiled for sm_90 by ``test_every_generated_kernel_compiles_for_sm90``
GENERATED: dict[str, AttentionPlan] = {}


def check_plan(
    plan: AttentionPlan, batch: int = 1, mask_tensor: torch.Tensor | None = None, device: str = "cpu"
) -> None:
    """Kernel vs reference on NaN-prefilled outputs, and visited blocks vs table vs dense mask."""
    GENERATED[plan.key()] = plan
    q, k, v, _ = inputs(plan, batch, device=device)
    b, h = batch, plan.num_heads
    table = plan.block_table()
    out = torch.full((b, h, plan.q_len, plan.head_dim_v), float("nan"), dtype=q.dtype, device=device)
    lse = torch.full((b, h, plan.q_len), float("nan"), device=device)
    visits = torch.full((b * h, table.num_q_blocks), -1, dtype=torch.int32, device=device)
    attention_fwd(
        plan, q, k, v, mask_tensor, out=out, lse=lse, visits=visits, target="cuda" if device == "cuda" else "interpret"
    )
    ref_out, ref_lse = attention_reference(plan, q, k, v, mask_tensor)
    assert not out.isnan().any(), "kernel left output elements unwritten"
    torch.testing.assert_close(out.float(), ref_out.float(), atol=OUT_ATOL[plan.dtype], rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL[plan.dtype], rtol=0)
    # no kernel reads an empty block: visits == block table == non-empty blocks of the dense mask
    prog = torch.tensor(plan.head_to_program)
    per_table = (table.kv_num_blocks + table.full_num_blocks)[prog]  # [H, nq]
    assert torch.equal(visits.view(b, h, -1).cpu(), per_table.unsqueeze(0).expand(b, -1, -1))
    assert torch.equal(per_table.sum(1).long(), nonempty_blocks(plan).sum((1, 2)).long())


@pytest.mark.parametrize("case", mask_cases.params(mask_cases.static_cases()))
def test_every_mask_case(case):
    mask = mask_cases.mask(case, 75)
    # random_blocks depends on the head: one program per head keeps its block table exact
    if mask.depends_on_head:
        plan = make_plan(mask, mask, q_len=75, heads=2, head_to_program=(0, 1))
    else:
        plan = make_plan(mask, q_len=75)
    check_plan(plan)


@pytest.mark.parametrize(
    "name, mask",
    [
        ("sink4_or_window8", M.Any_((M.Sink(4), M.Window(7, 0)))),
        ("not_causal", M.Not(M.Causal())),  # the last row sees no key: zeros and lse = -inf
        ("not_tile3d", M.Not(M.Tile3D((3, 5, 5), (0, 1, 1)))),
        ("neighborhood_or_sink", M.Any_((M.Neighborhood((3, 5, 5), (1, 3, 3)), M.Sink(3)))),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_compositions(name, mask):
    check_plan(make_plan(mask, q_len=75))


def test_tile3d_with_permutation():
    grid = (4, 4, 4)
    mask = M.Tile3D(grid, (1, 1, 1))
    plan = make_plan(mask, q_len=64, block=16, block_kv=16, permute=TilePermutation(grid, (2, 2, 4)))
    check_plan(plan, batch=2)


def test_tile3d_permuted_awkward_length():
    grid = (3, 5, 5)  # 75 tokens: the last block is padded in kernel order
    plan = make_plan(M.Tile3D(grid, (1, 2, 2)), q_len=75, permute=TilePermutation(grid, (1, 5, 5)))
    check_plan(plan)


def test_head_policies_two_programs():
    plan = make_plan(M.Causal(), M.Window(7, 0), heads=4, head_to_program=(1, 0, 0, 1), q_len=80)
    check_plan(plan, batch=2)


def test_three_programs_and_gqa():
    programs = (M.Causal(), M.Chunk(16), M.Any_((M.Sink(4), M.Window(7, 0))))
    plan = make_plan(*programs, heads=6, kv_heads=2, head_to_program=(0, 1, 2, 2, 1, 0), q_len=48)
    check_plan(plan)


@pytest.mark.parametrize("group", [2, 4], ids=["gqa2", "gqa4"])
def test_gqa_reads_shared_kv_head(group):
    check_plan(make_plan(M.Causal(), heads=4, kv_heads=4 // group, q_len=50))


@pytest.mark.parametrize("q_len", [63, 100], ids=["seq63", "seq100"])
def test_sequence_not_block_multiple(q_len):
    check_plan(make_plan(M.Causal(), q_len=q_len, block=32, block_kv=16), batch=2)


@pytest.mark.parametrize(
    "q_len,kv_len,q_offset",
    [(40, 100, 60), (33, 70, 0), (96, 50, 0)],
    ids=["decode_tail_q40_kv100", "q33_kv70", "q96_kv50"],
)
def test_q_len_differs_from_kv_len(q_len, kv_len, q_offset):
    check_plan(make_plan(M.Causal(), q_len=q_len, kv_len=kv_len, q_offset=q_offset))


@pytest.mark.parametrize(
    "head_dim,head_dim_v", [(16, 16), (64, 64), (80, 80), (48, 24)], ids=["d16", "d64", "d80", "d48_dv24"]
)
def test_head_dims(head_dim, head_dim_v):
    check_plan(make_plan(M.Window(20, 0), q_len=50, head_dim=head_dim, head_dim_v=head_dim_v))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes(dtype):
    check_plan(make_plan(M.Causal(), q_len=70, head_dim=64, dtype=dtype), batch=2)


def _bool_mask(batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Key padding per batch row, [B, 1, 1, Skv] (stride-0 broadcast over heads and queries)."""
    keep = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    keep[0, ..., kv_len - 9 :] = False
    keep[1, ..., :5] = False
    return keep


def test_model_mask_bool_broadcast():
    plan = make_plan(M.Causal(), q_len=60, mask_kind="bool")
    check_plan(plan, batch=2, mask_tensor=_bool_mask(2, 60, 60))


def test_model_mask_bool_full_per_head():
    plan = make_plan(M.Window(15, 0), q_len=48, mask_kind="bool")
    g = torch.Generator().manual_seed(1)
    check_plan(plan, batch=1, mask_tensor=torch.rand(1, 2, 48, 48, generator=g) > 0.3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_mask_additive(dtype):
    plan = make_plan(M.Full(), q_len=40, kv_len=56, mask_kind="additive", dtype=dtype)
    g = torch.Generator().manual_seed(2)
    add = torch.randn(40, 56, generator=g)  # [Sq, Skv], broadcast over batch and heads
    add[:, 50:] = float("-inf")
    add[3] = float("-inf")  # a row with nothing allowed
    check_plan(plan, batch=2, mask_tensor=add.to(DTYPES[dtype].torch))


def test_strided_inputs_are_not_copied():
    # q/k/v as transposed views of [B, S, H, D] tensors: strides reach the kernel unchanged
    plan = make_plan(M.Causal(), q_len=40, heads=2)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 32, generator=g).transpose(1, 2) for _ in range(3))
    out, lse = attention_fwd(plan, q, k, v, target="interpret")
    ref_out, ref_lse = attention_reference(plan, q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_executor_dispatch():
    plan = make_plan(M.Causal(), q_len=40)
    q, k, v, _ = inputs(plan)
    out, lse = run(plan, q, k, v, executor="interpret")
    ref_out, _ = run(plan, q, k, v, executor="reference")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="executor 'triton' runs on CUDA tensors"):
            run(plan, q, k, v, executor="triton")


def test_bad_inputs_are_reported():
    plan = make_plan(M.Causal(), q_len=40)
    q, k, v, _ = inputs(plan)
    with pytest.raises(ValueError, match="dtype"):
        run(plan, q.half(), k, v, executor="interpret")
    with pytest.raises(ValueError, match="shape"):
        run(plan, q[:, :, :30], k, v, executor="interpret")
    with pytest.raises(ValueError, match="mask_kind"):
        run(plan, q, k, v, torch.ones(40, 40, dtype=torch.bool), executor="interpret")
    with pytest.raises(ValueError, match="unknown executor 'cuda'"):
        run(plan, q, k, v, executor="cuda")


def test_unsupported_plans_raise():
    with pytest.raises(CodegenError, match="block_q 8"):
        generate_forward(make_plan(M.Causal(), block=8))
    selector = M.Selector("topk", (("k", 4),))
    with pytest.raises(CodegenError, match="run time"):
        generate_forward(make_plan(selector))
    with pytest.raises(CodegenError, match="float64"):
        generate_forward(make_plan(M.Causal(), dtype="float64"))


def test_generated_source_reads_like_a_kernel():
    plan = make_plan(M.Causal(), M.Window(7, 0), heads=2, head_to_program=(0, 1))
    src = generate_forward(plan)
    assert f"def {kernel_name(plan)}(" in src and kernel_name(plan) == "heads_causal_window8_fwd_kernel"
    assert "# [BM, BN]" in src and "tl.static_assert" in src and "make_block_ptr" not in src
    assert "HAS_PERM: tl.constexpr" in src and "tl.load(HeadToProgram + off_h)" in src
    one = generate_forward(make_plan(M.Causal()))
    assert "HeadToProgram" not in one and "_rb_hash" not in one
    assert "def _rb_hash" in emit_mask_predicate(make_plan(M.RandomBlocks(1, 0, 16)))


def test_cache_generates_once(tmp_path):
    cache = KernelCache(tmp_path)
    plan = make_plan(M.Causal(), q_len=32)
    first = cache.module(plan, "interpret")
    assert cache.stats.generated == 1
    assert cache.module(plan, "interpret") is first
    assert cache.stats.generated == 1 and cache.stats.hits == 1
    # a new process (a new cache object) finds the source on disk and generates nothing
    again = KernelCache(tmp_path)
    again.module(plan, "interpret")
    assert again.stats.generated == 0
    assert cache.source_path(plan).read_text() == generate_forward(plan)
    # other lengths, head dims and offsets are launch arguments: the same module serves them
    other = make_plan(M.Causal(), q_len=48, kv_len=80, head_dim=64, q_offset=32)
    assert cache.module(other, "interpret") is first and cache.stats.generated == 1
    # another mask is another kernel file
    cache.source(make_plan(M.Window(7, 0), q_len=32))
    assert cache.stats.generated == 2


def test_a_cached_file_that_differs_is_rewritten_before_import(tmp_path):
    plan = make_plan(M.Causal(), q_len=32)
    path = KernelCache(tmp_path).source(plan)
    path.write_text(path.read_text() + "\nraise RuntimeError('edited')\n")
    fresh = KernelCache(tmp_path)
    fresh.module(plan, "interpret")  # imports the regenerated text, not the edited one
    assert fresh.stats.generated == 1 and path.read_text() == generate_forward(plan)


def test_golden_source():
    """A refactor that changes the generated source shows up as a diff of this snapshot;
    ATTNCC_UPDATE_GOLDEN=1 rewrites it."""
    plan = make_plan(
        M.Causal(),
        M.Any_((M.Sink(4), M.Window(63, 0))),
        heads=4,
        kv_heads=2,
        head_to_program=(0, 0, 1, 1),
        q_len=256,
        head_dim=64,
        dtype="bfloat16",
        block=64,
        block_kv=64,
        rule="golden",
    )
    path = GOLDEN / "heads_causal_sink4_or_window64_fwd.py.txt"
    src = generate_forward(plan)
    if os.environ.get("ATTNCC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(src)
    assert path.exists(), f"{path} is missing; run with ATTNCC_UPDATE_GOLDEN=1 to create it"
    assert src == path.read_text(), f"generated source differs from {path}; ATTNCC_UPDATE_GOLDEN=1 accepts it"
    GENERATED[plan.key()] = plan


def test_dump_writes_kernels_and_manifest(tmp_path):
    plans = [make_plan(M.Causal(), q_len=64), make_plan(M.Window(15, 0), q_len=64)]
    manifest: dict = {}
    entries = write_kernels(tmp_path, plans + plans[:1], manifest=manifest, aot=False)
    assert len(entries) == 2 and manifest["kernels"] == entries
    for plan, e in zip(plans, entries):
        assert (tmp_path / e["file"]).read_text() == generate_forward(plan)
        assert (tmp_path / e["plan_file"]).read_text().startswith(f"plan {plan.key()}")
        assert e["kernel"] == kernel_name(plan) and (e["block_q"], e["block_kv"]) == (16, 16)
        dense = plan.dense_mask().flatten(1).double().mean(1).tolist()
        assert e["head_density"] == pytest.approx(dense, abs=1e-6)
    causal = entries[0]["blocks"]["per_program"][0]
    assert (causal["full"], causal["partial"], causal["total"]) == (6, 4, 16)


def test_dump_writes_backward_kernels_and_the_static_kernels_of_a_selection_plan(tmp_path):
    static = make_plan(M.Causal(), q_len=64)
    entry = write_kernels(tmp_path, [static], aot=False)[0]
    assert (tmp_path / entry["backward"]["file"]).exists()
    assert set(entry["backward"]["kernels"]) == {"preprocess", "dkdv", "dq"}
    assert (tmp_path / entry["decode"]["file"]).exists()
    assert set(entry["decode"]["kernels"]) == {"decode", "merge"}

    topk = parse_mask({"all": ["causal", {"any": [{"sink": 16}, {"topk": {"k": 1, "block": 16}}]}]}, {})
    entries = write_kernels(tmp_path / "dyn", [make_plan(topk, q_len=64)], aot=False)
    # the forward kernel runs twice per call: once over the selected blocks, once over the rest
    assert sorted(e["runs_for"].split(" of ")[0] for e in entries) == ["selected blocks", "unselected blocks"]
    assert all("error" in e["backward"] for e in entries)
    assert all((tmp_path / "dyn" / e["file"]).exists() for e in entries)


def test_dump_cli(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("attncc: 1\nname: t\nblock_size: 32\nrules:\n  - mask: {all: [causal, {window: 40}]}\n")
    out = tmp_path / "dump"
    assert (
        main(
            [
                "dump",
                str(spec),
                "--q-len",
                "100",
                "--heads",
                "2",
                "--head-dim",
                "64",
                "--dtype",
                "bf16",
                "--out",
                str(out),
                "--no-aot",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["kernels"]
    assert entry["kernel"] == "causal_window40_fwd_kernel" and (out / entry["file"]).exists()
    later = tmp_path / "later.yaml"
    later.write_text("attncc: 1\nname: t\nrules:\n  - where: {layers: '2-'}\n    mask: causal\n")
    assert main(["dump", str(later), "--q-len", "64", "--heads", "2", "--head-dim", "64", "--out", str(out)]) == 2
    assert "no rule" in capsys.readouterr().err


@pytest.mark.slow
def test_every_generated_kernel_compiles_for_sm90(tmp_path):
    """AOT: every kernel the tests above generated compiles for sm_90 (two worker subprocesses),
    each distinct plan once, plus a typical 64x64 bf16 tile whose resources are checked."""
    typical = make_plan(M.Causal(), heads=4, q_len=1024, head_dim=64, dtype="bfloat16", block=64, block_kv=64)
    chosen = list({p.key(): p for p in [typical, *GENERATED.values()]}.values())
    assert len(GENERATED) >= 30, "runs after the kernel tests, which register what they generate"
    print(f"compiling {len(chosen)} generated kernels for sm_90")
    results = compile_plans(chosen, tmp_path, archs=(90,), workers=2)
    failures = [(kernel_name(p), r[0]["error"]) for p, r in zip(chosen, results) if "error" in r[0]]
    assert not failures, failures
    sm90 = results[0][0]
    assert sm90["shared_bytes"] > 0 and sm90.get("num_regs", 1) > 0
    assert (tmp_path / sm90["files"]["ptx"]).read_text().startswith("//")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    "case",
    ["causal", "heads_gqa", "tile3d_perm", "mask_bool", "seq100_d80", "bf16", "fp16"],
)
def test_triton_executor_on_cuda(case):
    grid = (4, 8, 8)
    plans = {
        "causal": (make_plan(M.Causal(), q_len=512, head_dim=64, block=64, block_kv=64), None),
        "heads_gqa": (
            make_plan(
                M.Causal(),
                M.Window(63, 0),
                heads=4,
                kv_heads=2,
                head_to_program=(0, 1, 0, 1),
                q_len=300,
                head_dim=64,
                block=64,
                block_kv=32,
            ),
            None,
        ),
        "tile3d_perm": (
            make_plan(
                M.Tile3D(grid, (1, 2, 2)), q_len=256, block=64, block_kv=64, permute=TilePermutation(grid, (1, 8, 8))
            ),
            None,
        ),
        "mask_bool": (
            make_plan(M.Causal(), q_len=200, mask_kind="bool", block=64, block_kv=64),
            _bool_mask(2, 200, 200).cuda(),
        ),
        "seq100_d80": (make_plan(M.Causal(), q_len=100, head_dim=80, block=32, block_kv=32), None),
        "bf16": (make_plan(M.Causal(), q_len=256, head_dim=128, dtype="bfloat16", block=64, block_kv=64), None),
        "fp16": (make_plan(M.Window(100, 0), q_len=256, head_dim=64, dtype="float16", block=64, block_kv=64), None),
    }
    plan, mask = plans[case]
    check_plan(plan, batch=2, mask_tensor=mask, device="cuda")
