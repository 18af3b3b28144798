"""Training through the attncc backend: a tiny Llama with a streaming spec (sink + window) trained
for 3 steps gives the same losses and parameter gradients as the uncompiled model run with the
equivalent explicit 4-D mask (fp32, rtol 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch
from support import tiny_llama

import attncc

transformers = pytest.importorskip("transformers")

SEQ, BATCH, SINK, WINDOW = 40, 2, 4, 8
SPEC = {
    "attncc": 1,
    "name": "streaming-train",
    "block_size": 16,
    "masks": {"streaming": {"any": [{"sink": SINK}, {"window": WINDOW}]}},
    "rules": [{"where": {"module": "*"}, "mask": {"all": ["causal", "streaming"]}}],
}


def training_llama() -> torch.nn.Module:
    return tiny_llama(vocab_size=96, intermediate_size=128, max_position_embeddings=128, train=True)


def explicit_mask() -> torch.Tensor:
    """The spec as the additive 4-D mask a Llama accepts as is: ``[B, 1, S, S]``."""
    allowed = attncc.dense_mask(SPEC, SEQ)[0]  # [S, S]
    mask = torch.zeros(SEQ, SEQ).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask.expand(BATCH, 1, SEQ, SEQ)


def train(model, steps: int, mask: torch.Tensor | None):
    """Losses and per-step parameter gradients of ``steps`` SGD steps on fixed random tokens."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # a compiled module names its parameters under ``_orig_mod.``
    names = [n.removeprefix("_orig_mod.") for n, _ in model.named_parameters()]
    losses, grads = [], []
    for _ in range(steps):
        ids = torch.randint(0, 96, (BATCH, SEQ), generator=g)
        kwargs = {} if mask is None else {"attention_mask": mask}
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in zip(names, model.parameters())})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("executor", ["torch", "reference"])
def test_streaming_llama_trains_like_explicit_mask(executor):
    from attncc.counters import counters

    reference = training_llama()
    model = copy.deepcopy(reference)
    counters.clear()
    compiled = torch.compile(model, backend="attncc", options={"spec": SPEC, "executor": executor, "inner": "eager"})
    got_losses, got_grads = train(compiled, 3, None)
    assert counters["rewritten"] >= 2, f"expected both layers' attention rewritten, counters {dict(counters)}"
    want_losses, want_grads = train(reference, 3, explicit_mask())

    # the streaming mask really differs from plain causal attention at this length
    plain_losses, _ = train(training_llama(), 1, None)
    assert not torch.allclose(plain_losses[0], want_losses[0], rtol=1e-4)

    for step in range(3):
        torch.testing.assert_close(got_losses[step], want_losses[step], rtol=1e-4, atol=1e-6)
        for name, want in want_grads[step].items():
            torch.testing.assert_close(
                got_grads[step][name],
                want,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, n=name, s=step: f"step {s} grad {n}: {m}",
            )


def test_op_and_its_backward_appear_in_the_aot_graphs():
    from functorch.compile import aot_function, make_boxed_func

    from attncc.ir import masks as M
    from attncc.ir.plan import AttentionPlan
    from attncc.runtime.ops import attention
    from attncc.runtime.registry import register_plan

    plan = AttentionPlan.of(
        M.conj(M.Causal(), M.Window(7, 0)), num_heads=2, num_kv_heads=1, q_len=24, head_dim=16, block=16
    )
    key = register_plan(plan)
    # the generated forward and backward kernels, under the Triton interpreter
    executor = "interpret"
    graphs = {}

    def keep(name):
        def compiler(gm, _):
            graphs[name] = str(gm.code)
            return make_boxed_func(gm.forward)

        return compiler

    def f(q, k, v):
        return torch.ops.attncc.attention(q, k, v, None, None, None, key, executor)[0].square().sum()

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 24, 16, generator=g),
        torch.randn(1, 1, 24, 16, generator=g),
        torch.randn(1, 1, 24, 16, generator=g),
    )
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    aot_function(f, fw_compiler=keep("forward"), bw_compiler=keep("backward"))(*leaves).backward()
    assert "torch.ops.attncc.attention.default" in graphs["forward"]
    assert "torch.ops.attncc.attention_backward.default" in graphs["backward"]

    eager = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attention(plan, *eager, executor="reference").square().sum().backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
