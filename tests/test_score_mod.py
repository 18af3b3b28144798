"""Score modifications compiled into the kernels (attncc/ir/score_mod.py): soft-capping and ALiBi
in the forward, backward and decode kernels (Triton interpreter), the CPU executor and the
reference, against fp64 attention written in this file: ``cap * tanh(s / cap)`` then
``+ slope[h] * (kv_pos - q_pos)``, then the mask, through autograd for the gradients."""

from __future__ import annotations

import pytest
import torch
from support import inputs

from attncc.codegen import executors as E
from attncc.codegen.backward.generate import backward_source
from attncc.codegen.forward.generate import generate_forward
from attncc.codegen.forward.launch import attention_fwd
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan
from attncc.ir.score_mod import ScoreMod
from attncc.spec import parse_mask

SLOPES = (0.5, 0.25, 0.125, 0.0625)
MODS = {
    "softcap": ScoreMod(softcap=2.0),
    "alibi": ScoreMod(alibi=SLOPES),
    "softcap_alibi": ScoreMod(softcap=3.0, alibi=SLOPES),
}


def expected(q, k, v, mod: ScoreMod, scale: float, q_offset: int, pred):
    """fp64 attention with the modification written out; differentiable (autograd gives the
    reference gradients)."""
    h, hkv = q.shape[1], k.shape[1]
    kk, vv = (x.repeat_interleave(h // hkv, dim=1) for x in (k, v))
    s = (q @ kk.transpose(-1, -2)) * scale
    if mod.softcap is not None:
        s = mod.softcap * torch.tanh(s / mod.softcap)
    sq, skv = q.shape[2], k.shape[2]
    qpos = torch.arange(sq, dtype=torch.float64)[:, None] + q_offset
    kpos = torch.arange(skv, dtype=torch.float64)[None, :]
    if mod.alibi is not None:
        s = s + torch.tensor(mod.alibi, dtype=torch.float64)[:, None, None] * (kpos - qpos)
    allowed = pred(qpos, kpos)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ vv


def plan_of(mod: ScoreMod, mask: M.Mask, q_len: int, kv_len: int, **kw) -> AttentionPlan:
    return AttentionPlan.of(
        mask, num_heads=4, num_kv_heads=2, q_len=q_len, kv_len=kv_len, head_dim=32, block=16, score_mod=mod, **kw
    )


CAUSAL = (parse_mask("causal", {}), lambda q, k: k <= q)
WINDOW = (parse_mask({"all": ["causal", {"window": 24}]}, {}), lambda q, k: (k <= q) & (q - 24 < k))


@pytest.mark.parametrize("mod", sorted(MODS))
@pytest.mark.parametrize("executor", ["interpret", "torch", "reference"])
@pytest.mark.parametrize("case", ["causal", "window"])
def test_forward_and_backward_match_fp64(mod, executor, case):
    mask, pred = {"causal": CAUSAL, "window": WINDOW}[case]
    score_mod = MODS[mod]
    plan = plan_of(score_mod, mask, q_len=70, kv_len=90, q_positions="end")  # uneven, bottom-right
    q, k, v, _ = inputs(plan, batch=2, seed=1)
    # scores of order 1-3: soft-capping at 2-3 bends them (a cap far above the scores tests nothing)
    q = q * 3
    out, lse = E.run(plan, q, k, v, None, executor=executor)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = expected(qd, kd, vd, score_mod, plan.scale, plan.q_offset, pred)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=0)
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    dq, dk, dv = E.run_backward(plan, q, k, v, out, lse, dout, executor=executor)
    for got, want in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)


def test_the_modification_changes_the_answer():
    """The cases above would pass with the modification ignored if it did nothing: it does."""
    mask, pred = CAUSAL
    for mod in MODS.values():
        plan = plan_of(mod, mask, q_len=48, kv_len=48)
        q, k, v, _ = inputs(plan, seed=2)
        q = q * 3
        out, _ = attention_fwd(plan, q, k, v, target="interpret")
        plain = expected(q.double(), k.double(), v.double(), ScoreMod(softcap=1e9), plan.scale, 0, pred)
        assert (out.double() - plain).abs().max() > 1e-2


@pytest.mark.parametrize("mod", sorted(MODS))
def test_decode_kernel_applies_the_modification(mod):
    """A few queries at the end of a cache take the split-KV decode kernel."""
    mask, pred = WINDOW
    score_mod = MODS[mod]
    plan = plan_of(score_mod, mask, q_len=2, kv_len=200, q_positions="end")
    q, k, v, _ = inputs(plan, seed=3)
    q = q * 3
    out, _ = E.run(plan, q, k, v, None, executor="interpret")
    ref = expected(q.double(), k.double(), v.double(), score_mod, plan.scale, plan.q_offset, pred)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_sources_carry_the_modification_and_plans_without_one_are_unchanged():
    mask = CAUSAL[0]
    plain = AttentionPlan.of(mask, num_heads=4, q_len=64, head_dim=32)
    capped = plan_of(MODS["softcap_alibi"], mask, 64, 64)
    for gen in (generate_forward, backward_source):
        assert "_score_mod" not in gen(plain) and "_tanh" not in gen(plain)
        src = gen(capped)
        assert "_tanh" in src and "slope" in src
    assert "dmod" in backward_source(capped)
    assert capped.kernel_key() != plan_of(ScoreMod(softcap=3.5, alibi=SLOPES), mask, 64, 64).kernel_key()
    assert capped.pattern.endswith("softcap_alibi") and capped.key() != plain.key()


def test_bad_modifications_are_refused():
    with pytest.raises(ValueError, match="softcap"):
        ScoreMod(softcap=0.0)
    with pytest.raises(ValueError, match="softcap or alibi"):
        ScoreMod()
    with pytest.raises(ValueError, match="3 slopes for 4 heads"):
        plan_of(ScoreMod(alibi=(1.0, 2.0, 3.0)), CAUSAL[0], 32, 32)


def test_tanh_helper_is_accurate_across_its_branches(tmp_path):
    """The kernels' tanh (no libdevice under the interpreter) against torch's, fp32, at and around
    the branch point |x| = 1/8 and far out."""
    from attncc.codegen.cache import load_module
    from attncc.ir.score_mod import TANH_SOURCE

    kernel = "\n\n@triton.jit\ndef apply(X, Y, N: tl.constexpr):\n    o = tl.arange(0, N)\n"
    kernel += "    tl.store(Y + o, _tanh(tl.load(X + o)))\n"
    path = tmp_path / "tanh_kernel.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n" + TANH_SOURCE + kernel)
    module = load_module(path, "tanh_kernel", "interpret")
    x = torch.cat([torch.linspace(-0.3, 0.3, 2001), torch.linspace(-30, 30, 2001), torch.tensor([0.125, -0.125])])
    n = 1 << (x.numel() - 1).bit_length()
    xp = torch.nn.functional.pad(x, (0, n - x.numel()))
    yp = torch.empty_like(xp)
    module.apply[(1,)](xp, yp, n)
    torch.testing.assert_close(yp[: x.numel()].double(), torch.tanh(x.double()), atol=1.5e-7, rtol=3e-7)


def test_block_tables_skip_blocks_with_a_modification():
    """ALiBi is structure, not an S x S tensor: the window's empty blocks stay empty."""
    mask = WINDOW[0]
    plan = plan_of(MODS["alibi"], mask, 256, 256)
    q, k, v, _ = inputs(plan)
    visits = torch.zeros(4, 256 // 16, dtype=torch.int32)
    attention_fwd(plan, q, k, v, target="interpret", visits=visits)
    assert int(visits.max()) <= 3  # a 24-token window over 16-token blocks touches at most 3
