"""Every executor takes q/k/v of any strides (transposed from [B, H, D, S], sliced, expanded,
a [B, S, H, D] model layout seen as [B, H, S, D]) and gives what it gives on contiguous copies;
the fake (meta) outputs of forward and backward have the strides the real ones have."""

from __future__ import annotations

import pytest
import torch
from support import make_plan

from attncc.codegen import executors
from attncc.codegen.forward.reference import attention_reference
from attncc.ir import masks as M
from attncc.runtime.registry import register_plan


def strided(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x``'s values in a non-contiguous tensor of the same shape."""
    b, h, s, d = x.shape
    if how == "transposed":  # stored [B, H, D, S]
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "sliced":  # every other element of a wider last dim
        wide = torch.zeros(b, h, s, 2 * d, dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == "bshd":  # the layout models project into, seen as [B, H, S, D]
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "expanded":  # one head broadcast (only meaningful when all heads are equal)
        return x[:, :1].expand(b, h, s, d)
    raise ValueError(how)


LAYOUTS = ["transposed", "sliced", "bshd", "expanded"]
SHAPES = {
    "prefill": {"q_len": 40, "kv_len": 40},
    "decode": {"q_len": 1, "kv_len": 40, "q_offset": 39},
    "chunk": {"q_len": 5, "kv_len": 40, "q_offset": 35},
}
MASKS = {"causal": M.Causal(), "window": M.All((M.Causal(), M.Window(9, 0))), "full": M.Full()}


@pytest.mark.parametrize("executor", ["torch", "interpret", "reference"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_strides_same_result(layout, which, shape, executor):
    kw = SHAPES[shape]
    for name, mask in MASKS.items():
        plan = make_plan(mask, heads=4, kv_heads=2, head_dim=16, block=16, **kw)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, plan.q_len, 16, generator=g)
        k = torch.randn(2, 2, plan.kv_len, 16, generator=g)
        v = torch.randn(2, 2, plan.kv_len, 16, generator=g)
        if layout == "expanded":
            q, k, v = (x[:, :1].expand_as(x).contiguous() for x in (q, k, v))
        args = {"q": q, "k": k, "v": v}
        want, want_lse = attention_reference(plan, q, k, v)
        args[which] = strided(args[which], layout)
        if args[which].is_contiguous():  # a single query: transposing it changes nothing
            continue
        out, lse = executors.run(plan, args["q"], args["k"], args["v"], executor=executor)
        err = (out - want).abs().max().item()
        assert err < 1e-5, f"{name}: {which} {layout}, max |err| {err:.3g}"
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_fake_strides_equal_real_strides(executor):
    """Forward and backward outputs of the op: the fake impls' shapes and strides are the real
    ones for transposed inputs (what inductor checks with assert_size_stride)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    plan = make_plan(M.Causal(), heads=4, kv_heads=2, q_len=32, head_dim=16, block=16)
    key = register_plan(plan)
    g = torch.Generator().manual_seed(0)
    q, k, v = (strided(torch.randn(1, h, 32, 16, generator=g), "bshd") for h in (4, 2, 2))
    out, lse = torch.ops.attncc.attention(q, k, v, None, None, None, key, executor)
    dout = torch.randn_like(out)
    grads = torch.ops.attncc.attention_backward(q, k, v, out, lse, dout, None, None, None, None, key, executor)
    with FakeTensorMode() as mode:
        fq, fk, fv, fo, fl, fd = (mode.from_tensor(t) for t in (q, k, v, out, lse, dout))
        fake_out = torch.ops.attncc.attention(fq, fk, fv, None, None, None, key, executor)
        fake_grads = torch.ops.attncc.attention_backward(fq, fk, fv, fo, fl, fd, None, None, None, None, key, executor)
    for real, fake in zip((*out_lse(out, lse), *grads), (*fake_out, *fake_grads)):
        assert tuple(real.shape) == tuple(fake.shape) and real.stride() == fake.stride()


def out_lse(out, lse):
    return out, lse


@pytest.mark.parametrize("executor", ["torch", "interpret"])
def test_training_through_inductor_with_transposed_inputs(executor, fresh_compiler):
    """Training a Hugging Face Llama (q/k/v made by ``.transpose(1, 2)``) through the default
    compiler, which checks every op output's strides against its fake: loss and gradients equal
    the uncompiled model's (``mask: full`` keeps the model's causal mask). Inductor's graph cache
    is off, so the check runs on this version's fakes."""
    from support import tiny_llama

    model = tiny_llama(layers=2, train=True)
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    spec = {"attncc": 1, "block_size": 16, "rules": [{"mask": "full"}]}
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(model, backend="attncc", options={"spec": spec, "executor": executor, "strict": True})
        loss = compiled(ids, labels=ids).loss
        got = torch.autograd.grad(loss, list(model.parameters()))
    want_loss = model(ids, labels=ids).loss
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("executor", ["torch", "interpret", "reference"])
@pytest.mark.parametrize("lengths", [(0, 16), (4, 0), (0, 0)])
def test_zero_length_sequences_give_eager_shapes(lengths, executor):
    """No queries or no keys: eager SDPA's shapes and values (no key: zeros), lse -inf, and
    zero gradients through the op."""
    q_len, kv_len = lengths
    plan = make_plan(M.Causal(), heads=2, kv_heads=2, q_len=q_len, kv_len=kv_len, head_dim=16, block=16)
    q = torch.randn(1, 2, q_len, 16, requires_grad=True)
    k = torch.randn(1, 2, kv_len, 16, requires_grad=True)
    v = torch.randn(1, 2, kv_len, 16, requires_grad=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out, lse = torch.ops.attncc.attention(q, k, v, None, None, None, register_plan(plan), executor)
    assert out.shape == want.shape and torch.equal(out, torch.zeros_like(want))
    assert lse.shape == (1, 2, q_len) and bool(torch.isneginf(lse).all())
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or not bool(g.any()) for g in grads)
