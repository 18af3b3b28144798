"""Kernel tiles decoupled from the sparsity block (codegen/configs.py): the forward and backward
kernels on the tiles of the GPU tables, run here under the Triton interpreter, against fp64
attention with an explicit mask whose predicate is written in this file; tables given at run time
walked as sub-tiles; autotune choosing and caching on disk; lengths that do not recompile."""

from __future__ import annotations

import json

import pytest
import torch
from support import inputs

from attncc.codegen import configs as C
from attncc.codegen.backward.launch import attention_bwd
from attncc.codegen.forward.launch import attention_fwd, device_data
from attncc.ir import masks as M
from attncc.ir.permute import TilePermutation
from attncc.ir.plan import AttentionPlan
from attncc.spec import parse_mask

#: (mask, predicate over absolute positions) pairs; predicates from docs/spec.md's table
CASES = {
    "causal": (parse_mask("causal", {}), lambda q, k: k <= q),
    "window": (parse_mask({"window": 37}, {}), lambda q, k: (q - 37 < k) & (k <= q)),
    "sink_window": (
        parse_mask({"all": ["causal", {"any": [{"sink": 5}, {"window": 24}]}]}, {}),
        lambda q, k: (k <= q) & ((k < 5) | (q - 24 < k)),
    ),
    "chunk": (parse_mask({"chunk": 48}, {}), lambda q, k: q // 48 == k // 48),
}

#: every distinct tile shape of the sm_90 / sm_80 forward tables, plus sub-block tiles
FORWARD_TILES = sorted({(c.block_m, c.block_n) for c in C.FORWARD.values()} | {(16, 32), (32, 16)})


def dense_reference(q, k, v, allowed: torch.Tensor, scale: float):
    """fp64 softmax attention where ``allowed [H, Sq, Skv]`` (GQA by repeating kv heads); rows with
    no key give 0 and lse -inf."""
    h, hkv = q.shape[1], k.shape[1]
    k, v = (x.double().repeat_interleave(h // hkv, dim=1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return p @ v, lse


def allowed_of(pred, q_len: int, kv_len: int, offset: int, heads: int, order=None):
    qpos = torch.arange(q_len)[:, None] + offset
    kpos = torch.arange(kv_len)[None, :]
    return pred(qpos, kpos).expand(heads, q_len, kv_len)


def plan_of(mask: M.Mask, q_len=160, kv_len=None, heads=4, kv_heads=2, dim=32, dtype="float32", **kw) -> AttentionPlan:
    return AttentionPlan.of(
        mask, num_heads=heads, num_kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=dim, dtype=dtype, **kw
    )


@pytest.mark.parametrize("tiles", FORWARD_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", ["causal", "sink_window"])
def test_forward_on_table_tiles(case, tiles):
    mask, pred = CASES[case]
    plan = plan_of(mask, q_len=150, kv_len=170, q_positions="end")  # uneven lengths, bottom-right
    q, k, v, _ = inputs(plan, batch=2)
    cfg = C.TileConfig(*tiles, 4, 3)
    out, lse = attention_fwd(plan, q, k, v, target="interpret", config=cfg)
    ref, ref_lse = dense_reference(q, k, v, allowed_of(pred, 150, 170, 20, 4), plan.scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_table_is_built_at_the_tile_and_skips_empty_tiles(case):
    """The table at a tile larger and one smaller than the plan's blocks: each program visits
    exactly the non-empty (query tile, kv tile) pairs of the dense mask."""
    mask, pred = CASES[case]
    plan = plan_of(mask, q_len=192, block=64)
    allowed = allowed_of(pred, 192, 192, 0, 1)[0]
    q, k, v, _ = inputs(plan)
    for bm, bn in ((128, 128), (32, 16)):
        nq, nk = -(-192 // bm), -(-192 // bn)
        padded = torch.zeros(nq * bm, nk * bn, dtype=torch.bool)
        padded[:192, :192] = allowed
        want = padded.view(nq, bm, nk, bn).any(3).any(1).sum(1).int()  # [nq] non-empty tiles per row
        visits = torch.full((plan.num_heads, nq), -1, dtype=torch.int32)
        out, _ = attention_fwd(plan, q, k, v, target="interpret", config=C.TileConfig(bm, bn, 4, 2), visits=visits)
        assert torch.equal(visits, want.expand(plan.num_heads, -1)), (bm, bn)
        ref, _ = dense_reference(q, k, v, allowed.expand(plan.num_heads, -1, -1), plan.scale)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_runtime_table_is_walked_in_sub_tiles():
    """A block table given at 64 x 64 (as selections give it) run on 32 x 16 tiles: every program
    walks the sub-tiles of its table row; a tile larger than the table's blocks is clipped."""
    mask, pred = CASES["causal"]
    plan = plan_of(mask, q_len=192, block=64)
    table = plan.block_table()
    q, k, v, _ = inputs(plan)
    ref, ref_lse = dense_reference(q, k, v, allowed_of(pred, 192, 192, 0, plan.num_heads), plan.scale)
    for cfg in (C.TileConfig(32, 16, 4, 2), C.TileConfig(128, 128, 4, 3)):
        out, lse = attention_fwd(plan, q, k, v, target="interpret", config=cfg, block_table=table)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
    tiles, qm, km = C.fit_to_table(C.TileConfig(128, 128, 4, 3), 64, 64)
    assert (tiles.block_m, tiles.block_n, qm, km) == (64, 64, 1, 1)
    assert C.fit_to_table(C.TileConfig(16, 32, 4, 3), 64, 64)[1:] == (4, 2)


def test_permuted_plan_on_other_tiles():
    """A tiled token order (static permutation) classified at the kernel's tiles."""
    grid, tile = (2, 8, 12), (1, 4, 4)
    n = 2 * 8 * 12
    mask = parse_mask({"tile3d": {"grid": list(grid), "window": [0, 1, 1]}}, {})
    perm = TilePermutation(grid, tile)
    plan = plan_of(mask, q_len=n, heads=2, kv_heads=2, block=16, permute=perm)
    q, k, v, _ = inputs(plan)
    t, h, w = (torch.arange(n) // (grid[1] * grid[2]), torch.arange(n) // grid[2] % grid[1], torch.arange(n) % grid[2])

    def pred(qp, kp):
        return ((t[qp] - t[kp]).abs() <= 0) & ((h[qp] - h[kp]).abs() <= 1) & ((w[qp] - w[kp]).abs() <= 1)

    ref, _ = dense_reference(q, k, v, allowed_of(pred, n, n, 0, 2), plan.scale)
    for cfg in (C.TileConfig(64, 32, 4, 2), C.TileConfig(16, 16, 4, 2)):
        out, _ = attention_fwd(plan, q, k, v, target="interpret", config=cfg)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "cfg",
    [C.BACKWARD[("sm90", "16bit", 64)], C.BACKWARD[("sm90", "16bit", 128)], C.BACKWARD_FALLBACK],
    ids=["sm90-d64", "sm90-d128", "fallback"],
)
def test_backward_on_table_tiles(cfg):
    mask, pred = CASES["sink_window"]
    plan = plan_of(mask, q_len=150, kv_len=170, q_positions="end")
    q, k, v, dout = inputs(plan, batch=2)
    out, lse = attention_fwd(plan, q, k, v, target="interpret", config=cfg.dq)
    dq, dk, dv = attention_bwd(plan, q, k, v, out, lse, dout, target="interpret", config=cfg)
    allowed = allowed_of(pred, 150, 170, 20, 4)
    qd, kd, vd = (x.double().requires_grad_(True) for x in (q, k, v))
    ref, _ = dense_reference(qd, kd, vd, allowed, plan.scale)
    ref.backward(dout.double())
    for got, want in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)


def test_default_configs_follow_the_anchor_tables():
    plan = plan_of(CASES["causal"][0], dim=64, dtype="bfloat16")
    # FlexAttention's 128-row tile, 3 stages, with the warps that keep this kernel off the stack
    assert C.forward_config(plan, 90) == C.TileConfig(128, 64, 8, 3)
    assert C.forward_config(plan_of(CASES["causal"][0], dim=128, dtype="float16"), 90) == C.TileConfig(128, 64, 8, 3)
    assert C.forward_config(plan, None) == C.plan_tiles(plan)  # the interpreter keeps the plan's blocks
    assert C.forward_config(plan, 70) == C.FORWARD_FALLBACK
    with pytest.raises(ValueError, match="power of two"):
        C.TileConfig(48, 64, 4, 3)


def test_autotune_picks_the_fastest_and_caches_it(tmp_path):
    cache = C.TuningCache(tmp_path / "tuning.json")
    cands = [C.TileConfig(64, 64, 4, 3), C.TileConfig(128, 64, 4, 3), C.TileConfig(32, 32, 4, 3)]
    fake_ms = {cands[0]: 3.0, cands[1]: 1.0, cands[2]: 2.0}
    ran: list = []

    def run(cfg):
        if cfg.block_m == 32:
            raise RuntimeError("out of shared memory")  # a config the device cannot run is dropped
        ran.append(cfg)

    def timer(fn):
        fn()
        return fake_ms[ran[-1]]

    assert C.autotuned("k", cands, run, timer, cache) == cands[1]
    saved = json.loads((tmp_path / "tuning.json").read_text())["k"]
    assert (saved["block_m"], saved["block_n"]) == (128, 64)
    assert set(saved["times_ms"]) == {"64x64 w4 s3", "128x64 w4 s3"}
    ran.clear()
    assert C.autotuned("k", cands, run, timer, C.TuningCache(tmp_path / "tuning.json")) == cands[1]
    assert not ran  # read from disk, nothing timed

    def failing(cfg):
        raise RuntimeError(f"cannot run {cfg.text()}")

    with pytest.raises(RuntimeError, match="cannot run 64x64"):
        C.autotuned("other", cands, failing, timer, cache)


def test_corrupt_tuning_file_is_ignored(tmp_path):
    (tmp_path / "tuning.json").write_text("{not json")
    cache = C.TuningCache(tmp_path / "tuning.json")
    assert cache.get("k") is None
    bad = {"k": {"block_m": 48, "block_n": 64, "num_warps": 4, "num_stages": 3}}
    (tmp_path / "t2.json").write_text(json.dumps(bad))
    assert C.TuningCache(tmp_path / "t2.json").get("k") is None  # an invalid entry is not used


def test_lengths_are_runtime_arguments():
    """Lengths, the query offset and table widths are run-time ints the JIT does not specialise
    on, forward and backward: a call at a new length reuses the compiled kernel."""
    from attncc.codegen.backward.generate import RUNTIME_INTS as BWD
    from attncc.codegen.cache import BACKWARD, FORWARD, default_cache
    from attncc.codegen.forward.generate import RUNTIME_INTS as FWD

    plan = plan_of(CASES["causal"][0])
    # the modules as the GPU compiler imports them (JITFunctions with their parameters)
    fwd = default_cache().kernel(plan, "cuda")
    module = default_cache().module(plan, "cuda", BACKWARD)
    bwd = [getattr(module, n) for n in dir(module) if n.endswith(("_dkdv_kernel", "_dq_kernel"))]
    kernels = [(fwd, FWD)] + [(k, BWD) for k in bwd]
    assert len(kernels) == 3 and FORWARD != BACKWARD
    for kernel, names in kernels:
        params = {p.name: p for p in kernel.params}
        for name in names:
            assert not params[name].is_constexpr, name
            assert params[name].do_not_specialize, name
    assert device_data(plan, torch.device("cpu"), C.TileConfig(128, 32, 4, 3))[0].block_q == 128


def test_rows_run_longest_first():
    """A causal table's rows in decreasing work; partial blocks weigh more than full ones; ties
    keep row order. The kernel maps programs through it (the visits and outputs of the tests
    above are per table row, so a wrong mapping fails them)."""
    from attncc.codegen.forward.launch import longest_first

    plan = plan_of(CASES["causal"][0], q_len=256, block=64)
    order = longest_first(plan.block_table())
    assert order.tolist() == [[3, 2, 1, 0]]
    chunk = plan_of(CASES["chunk"][0], q_len=192, block=16)  # every row the same work
    assert longest_first(chunk.block_table()).tolist() == [list(range(12))]


def test_prepared_launches_are_reused_and_recordings_are_not():
    from attncc.codegen import aot
    from attncc.codegen.cache import default_cache
    from attncc.codegen.forward import launch as L

    plan = plan_of(CASES["window"][0], q_len=96)
    q, k, v, _ = inputs(plan)
    L.attention_fwd(plan, q, k, v, target="interpret")
    n = len(L._prepared)
    out, _ = L.attention_fwd(plan, q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, target="interpret")
    assert len(L._prepared) == n  # same plan, tiles and device: nothing rebuilt; strides are per call
    ref, _ = dense_reference(q, k, v, allowed_of(CASES["window"][1], 96, 96, 0, 4), plan.scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    recording = aot.RecordingCache(default_cache().root)
    L.attention_fwd(plan, q, k, v, target="cuda", arch=90, cache=recording)
    L.attention_fwd(plan, q, k, v, target="cuda", arch=90, cache=recording)
    assert len(recording.launches) == 2 and len(L._prepared) == n


@pytest.mark.parametrize("kv_len", [80, 96, 144])
@pytest.mark.parametrize("case", ["full", "causal"])
def test_sub_tiles_past_the_last_key_are_never_read(case, kv_len):
    """A table at 64-token blocks walked in 16- and 32-key sub-tiles, kv_len a multiple of the
    tile but not of the block: memory past the last key (K = 5, V = 100 here) must not count."""
    mask = parse_mask(case, {})
    plan = plan_of(mask, q_len=kv_len, kv_len=kv_len, heads=2, kv_heads=2, block=64)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, kv_len, 32, generator=g)
    kb, vb = torch.randn(1, 2, 256, 32, generator=g), torch.randn(1, 2, 256, 32, generator=g)
    kb[:, :, kv_len:], vb[:, :, kv_len:] = 5.0, 100.0
    k, v = kb[:, :, :kv_len], vb[:, :, :kv_len]
    allowed = torch.ones(2, kv_len, kv_len, dtype=torch.bool)
    if case == "causal":
        allowed = allowed.tril()
    ref, _ = dense_reference(q, k, v, allowed, plan.scale)
    for cfg in (C.TileConfig(16, 16, 4, 2), C.TileConfig(64, 32, 8, 2)):
        out, _ = attention_fwd(plan, q, k, v, target="interpret", config=cfg, block_table=plan.block_table())
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0, msg=cfg.text())
