"""The decode path (few queries over many keys: decoding, speculative verification, chunks)
against fp64 SDPA given the plan's mask explicitly, on the CPU path and the split-KV Triton
kernel under the interpreter; and that it visits only the blocks the spec keeps."""

from __future__ import annotations

import mask_cases
import pytest
import torch
import torch.nn.functional as F
from support import make_plan

from attncc.codegen import executors
from attncc.codegen.decode import table as T
from attncc.codegen.decode.generate import generate_decode
from attncc.codegen.decode.launch import decode_fwd, write_decode_kernels
from attncc.codegen.decode.torch_path import decode_torch_forward
from attncc.ir import masks as M
from attncc.ir.dtypes import dtype_name
from attncc.ir.masks.base import MaskError
from attncc.ir.plan import AttentionPlan

DECODERS = {
    "torch": decode_torch_forward,
    "interpret": lambda plan, q, k, v, mask=None, **kw: decode_fwd(plan, q, k, v, mask, target="interpret", **kw),
}
#: split counts the Triton kernel is also run with (the merge must be exact for any)
SPLITS = (1, 3)


def decode_plan(*programs: M.Mask, q_len: int = 1, kv_len: int = 150, heads: int = 4, kv_heads: int = 2, **kw):
    """A plan for ``q_len`` queries at the end of ``kv_len`` keys (bottom-right)."""
    return make_plan(
        *programs,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=kv_len - q_len,
        **{"head_dim": 16, "block": 16, **kw},
    )


def qkv(plan: AttentionPlan, batch: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, plan.num_heads, plan.q_len, plan.head_dim, generator=g).to(dtype)
    k = torch.randn(batch, plan.num_kv_heads, plan.kv_len, plan.head_dim, generator=g).to(dtype)
    v = torch.randn(batch, plan.num_kv_heads, plan.kv_len, plan.head_dim_v, generator=g).to(dtype)
    return q, k, v


def sdpa_fp64(plan: AttentionPlan, q, k, v, model_mask=None):
    """``(out, lse, rows with no key)`` of fp64 SDPA with the plan's mask (and the model's) as an
    explicit boolean or additive mask; rows with no allowed key are reported, not computed."""
    allowed = plan.dense_mask().unsqueeze(0)  # [1, H, Sq, Skv]
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    if model_mask is not None:
        bias = bias + (
            torch.zeros(model_mask.shape, dtype=torch.float64).masked_fill(~model_mask, float("-inf"))
            if model_mask.dtype == torch.bool
            else model_mask.double()
        )
    bias = bias.expand(q.shape[0], -1, -1, -1)
    dead = torch.isneginf(bias).all(-1)
    safe = bias.masked_fill(dead.unsqueeze(-1), 0.0)
    g = plan.gqa_group
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(q.double(), kd, vd, attn_mask=safe, scale=plan.scale)
    scores = q.double() @ kd.transpose(-1, -2) * plan.scale + safe
    return out, torch.logsumexp(scores, -1), dead


def check(plan, decoder, model_mask=None, dtype=torch.float32, atol=2e-5, **kw):
    q, k, v = qkv(plan, dtype=dtype)
    out, lse = decoder(plan, q, k, v, model_mask, **kw)
    ref, ref_lse, dead = sdpa_fp64(plan, q, k, v, model_mask)
    assert out.dtype == dtype and lse.dtype == torch.float32
    live = ~dead
    torch.testing.assert_close(out.double()[live], ref[live], atol=atol, rtol=1e-4)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=2e-5, rtol=1e-5)
    assert bool((out[dead] == 0).all()) and bool(torch.isneginf(lse[dead]).all())


@pytest.mark.parametrize("decoder", list(DECODERS))
@pytest.mark.parametrize("case", mask_cases.params(mask_cases.static_cases()))
def test_every_mask_at_decode(case, decoder):
    try:
        plan = decode_plan(mask_cases.mask(case, 150), q_len=3)
    except MaskError as e:  # grid masks (video) hold exactly their grid's tokens on both sides
        assert "grid" in str(e)
        pytest.skip(str(e))
    assert T.unsupported(plan) is None
    check(plan, DECODERS[decoder])


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param({"q_len": 1, "kv_len": 301}, id="one_query_ragged"),
        pytest.param({"q_len": 8, "kv_len": 256}, id="chunk_of_8"),
        pytest.param({"q_len": 4, "kv_len": 97, "heads": 8, "kv_heads": 2}, id="gqa4_speculative"),
        pytest.param({"q_len": 2, "kv_len": 80, "heads": 3, "kv_heads": 3}, id="mha"),
    ],
)
def test_shapes_and_splits(shape, splits):
    sink_window = M.All((M.Causal(), M.Any_((M.Sink(4), M.Window(40, 0)))))
    plan = decode_plan(sink_window, **shape)
    for name, decoder in DECODERS.items():
        kw = {"splits": splits} if name == "interpret" else {}
        check(plan, decoder, **kw)


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_head_policy_inside_a_kv_group(decoder):
    """Query heads of one kv head with different programs: the union of their blocks, each row
    masked by its own program (heads 0 and 1 share kv head 0)."""
    plan = decode_plan(
        M.Causal(), M.All((M.Causal(), M.Window(20, 0))), M.Not(M.Full()), head_to_program=(0, 1, 1, 2), q_len=2
    )
    check(plan, DECODERS[decoder])
    table = T.build_decode_table(plan)
    assert table.classes == ((0,), (1,))


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_model_mask_tensor(kind, decoder):
    """A padding mask from the model (batch 0 left-padded by 30, a whole row dead in batch 1)."""
    plan = decode_plan(M.All((M.Causal(), M.Any_((M.Sink(2), M.Window(50, 0))))), q_len=2, mask_kind=kind)
    keep = torch.ones(2, 1, 2, 150, dtype=torch.bool)
    keep[0, :, :, :30] = False
    keep[1, :, 1, :] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    check(plan, DECODERS[decoder], mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_dtypes(dtype, decoder):
    if decoder == "interpret" and dtype == torch.float64:
        pytest.skip("no fp64 Triton kernel")
    plan = decode_plan(M.All((M.Causal(), M.Window(33, 0))), q_len=2, dtype=dtype_name(dtype))
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}[dtype]
    check(plan, DECODERS[decoder], dtype=dtype, atol=tol)


def test_head_dim_v_differs():
    plan = decode_plan(M.Causal(), q_len=2, head_dim_v=24)
    for decoder in DECODERS.values():
        check(plan, decoder)


def test_visits_only_the_kept_blocks():
    """Sink 4 + window 1024 over 32k keys: 17 of 512 blocks (64 tokens) for every context
    length (18 when the window straddles a block), never the S x S map (2^30 cells)."""
    sw = M.All((M.Causal(), M.Any_((M.Sink(4), M.Window(1023, 0)))))
    for kv_len in (2048, 8192, 32768, 32769):
        plan = AttentionPlan.of(
            sw, num_heads=8, num_kv_heads=2, q_len=1, kv_len=kv_len, q_offset=kv_len - 1, head_dim=64, block=64
        )
        table = T.build_decode_table(plan)
        assert table.visited().tolist() == [17 + (kv_len % 64 != 0)] * 2
        # the sink's block, the window's first block when it starts inside one, the last block
        assert table.most_partial <= 3


def test_which_calls_take_the_decode_path():
    assert T.unsupported(decode_plan(M.Causal(), q_len=16, heads=4, kv_heads=4)) is None
    assert "queries" in T.unsupported(decode_plan(M.Causal(), q_len=17, heads=1, kv_heads=1))
    assert "rows" in T.unsupported(decode_plan(M.Causal(), q_len=16, heads=8, kv_heads=1))
    topk = mask_cases.mask("topk", 150)
    assert "data" in T.unsupported(decode_plan(topk))


@pytest.mark.parametrize("name", ["torch", "interpret"])
def test_executors_route_decode_calls(name, monkeypatch):
    """``run`` sends a decode-shaped static plan to the executor's decode path, a prefill-shaped
    one to its forward."""
    called = []
    ex = executors.EXECUTORS[name]
    monkeypatch.setitem(
        executors.EXECUTORS,
        name,
        type(ex)(
            ex.name,
            ex.device,
            ex.target,
            lambda *a: called.append("forward") or ex.forward(*a),
            ex.backward,
            ex.description,
            lambda *a: called.append("decode") or ex.decode(*a),
        ),
    )
    for plan in (decode_plan(M.Causal(), q_len=1), decode_plan(M.Causal(), q_len=64, kv_len=64)):
        executors.run(plan, *qkv(plan), executor=name)
    assert called == ["decode", "forward"]


def test_decode_kernels_compile_for_sm90(tmp_path):
    """The dump compiles a decode step's kernels for Hopper without a GPU; a plan whose decode
    steps cannot take the path says why."""
    sw = M.All((M.Causal(), M.Any_((M.Sink(4), M.Window(255, 0)))))
    plan = AttentionPlan.of(sw, num_heads=8, num_kv_heads=2, q_len=1024, head_dim=64, block=64, dtype="bfloat16")
    topk = AttentionPlan.of(mask_cases.mask("topk", 64), num_heads=2, q_len=64, head_dim=32, block=16)
    video = AttentionPlan.of(mask_cases.mask("tile3d", 64), num_heads=2, q_len=64, head_dim=32, block=16)
    (entry,), refused = write_decode_kernels(tmp_path, [plan, plan, topk, video], archs=(90,))
    assert (tmp_path / entry["file"]).read_text() == generate_decode(plan)
    for name in entry["kernels"].values():
        target = entry["targets"]["sm_90"][name]
        assert "error" not in target, target["error"]
        ptx = (tmp_path / target["files"]["ptx"]).read_text()
        assert ".target sm_90" in ptx and f".entry {name}" in ptx
    assert "data" in refused[topk.key()]
    assert "grid" in refused[video.key()]


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_a_mask_that_keeps_no_key(decoder):
    """Found by the fuzz: a decode step whose mask keeps nothing gives zeros and lse -inf."""
    plan = decode_plan(M.Not(M.Full()), q_len=1)
    check(plan, DECODERS[decoder])
