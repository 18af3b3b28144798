"""Differential fuzz: random specs x lengths x GQA x dtypes x executors against attention with an
explicit mask built from docs/spec.md's predicates (written here, fp64, masked by selection),
forward and backward. Bounded to about a minute; the number of cases run is printed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attncc.runtime.registry import register_plan
from attncc.spec import SiteShape, load_spec, plan_for

#: spec node -> predicate(q, kv) over absolute positions (int64 tensors), from docs/spec.md's table
LEAVES = {
    "full": lambda a: lambda q, k: torch.ones_like(q >= k),
    "causal": lambda a: lambda q, k: k <= q,
    "window": lambda n: lambda q, k: (q - n < k) & (k <= q),
    "window2": lambda ab: lambda q, k: (q - ab[0] <= k) & (k <= q + ab[1]),
    "sink": lambda n: lambda q, k: (k < n) | torch.zeros_like(q >= k),
    "prefix": lambda n: lambda q, k: (k < n) | torch.zeros_like(q >= k),
    "global": lambda n: lambda q, k: (q < n) | (k < n),
    "chunk": lambda b: lambda q, k: q // b == k // b,
    "block_causal": lambda b: lambda q, k: k // b <= q // b,
    "strided": lambda s: lambda q, k: (q - k) % s == 0,
    "power": lambda length: lambda q, k: _power(q - k, length),
}


def _power(d, length):
    """d in [0, length) or d a power of two."""
    return ((d >= 0) & (d < length)) | ((d > 0) & ((d & (d - 1)) == 0))


@st.composite
def leaf(draw):
    kind = draw(st.sampled_from(sorted(LEAVES)))
    if kind in ("full", "causal"):
        return kind, LEAVES[kind](None)
    if kind == "window2":
        ab = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
        return {"window": {"before": ab[0], "after": ab[1]}}, LEAVES[kind](ab)
    n = draw(st.integers(1, 70))
    return {kind: n}, LEAVES[kind](n)


def node(depth: int = 0):
    if depth >= 2:
        return leaf()
    return st.one_of(
        leaf(),
        st.builds(_all, st.lists(st.deferred(lambda: node(depth + 1)), min_size=1, max_size=3)),
        st.builds(_any, st.lists(st.deferred(lambda: node(depth + 1)), min_size=1, max_size=3)),
        st.builds(_not, st.deferred(lambda: node(depth + 1))),
    )


def _all(items):
    preds = [p for _, p in items]
    return {"all": [n for n, _ in items]}, lambda q, k: _reduce(preds, q, k, torch.logical_and)


def _any(items):
    preds = [p for _, p in items]
    return {"any": [n for n, _ in items]}, lambda q, k: _reduce(preds, q, k, torch.logical_or)


def _not(item):
    n, p = item
    return {"not": n}, lambda q, k: ~p(q, k)


def _reduce(preds, q, k, op):
    out = preds[0](q, k)
    for p in preds[1:]:
        out = op(out, p(q, k))
    return out


SHAPES = [(1, 1), (63, 63), (257, 257), (1, 130), (5, 130), (64, 200)]
HEADS = [(2, 2), (4, 2), (6, 2)]
DTYPES = {"float32": (torch.float32, 2e-4), "float16": (torch.float16, 4e-3), "bfloat16": (torch.bfloat16, 3e-2)}
RUN = {"cases": 0, "by_executor": {}}


def oracle(pred, q, k, v, q_offset, scale):
    """fp64 attention with the predicate's mask, masked by selection; rows with no key give 0."""
    b, h, sq, _ = q.shape
    g = h // k.shape[1]
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    qp = (torch.arange(sq) + q_offset).view(-1, 1)
    kp = torch.arange(k.shape[2]).view(1, -1)
    allowed = pred(qp, kp) & (kp <= qp)  # the model's own mask is causal (bottom-right)
    scores = torch.where(allowed, q.double() @ kd.transpose(-1, -2) * scale, float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    p = torch.where(allowed, torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)), 0.0)
    return p @ vd


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    mask=node(),
    shape=st.sampled_from(SHAPES),
    heads=st.sampled_from(HEADS),
    dtype=st.sampled_from(sorted(DTYPES)),
    executor=st.sampled_from(["torch", "torch", "interpret"]),
    block=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_the_documented_predicates(mask, shape, heads, dtype, executor, block, seed):
    spec_node, pred = mask
    (q_len, kv_len), (h, hkv) = shape, heads
    if executor == "interpret" and q_len * kv_len > 64 * 200:
        executor = "torch"  # the interpreter on the larger shapes would take most of the minute
    spec = load_spec({"attncc": 1, "block_size": block, "rules": [{"mask": spec_node}]})
    q_offset = kv_len - q_len
    site = SiteShape(
        num_heads=h,
        num_kv_heads=hkv,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=16,
        dtype=dtype,
        q_positions="end" if q_len != kv_len else "start",
        model_mask=load_spec({"attncc": 1, "rules": [{"mask": "causal"}]}).compiled(0).base,
        q_offset=q_offset,
    )
    plan = plan_for(spec, site)
    torch_dtype, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, q_len, 16, generator=g).to(torch_dtype).requires_grad_(True)
    k = torch.randn(2, hkv, kv_len, 16, generator=g).to(torch_dtype).requires_grad_(True)
    v = torch.randn(2, hkv, kv_len, 16, generator=g).to(torch_dtype).requires_grad_(True)
    out, _ = torch.ops.attncc.attention(q, k, v, None, None, None, register_plan(plan), executor)
    want = oracle(pred, q, k, v, q_offset, plan.scale)
    err = (out.double() - want).abs().max().item()
    assert err <= tol, f"{spec_node} {shape} {heads} {dtype} {executor} block {block}: max |out - oracle| {err:.3g}"
    if dtype == "float32":
        dout = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad((out * dout).sum(), (q, k, v))
        qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        ref = torch.autograd.grad((oracle(pred, qd, kd, vd, q_offset, plan.scale) * dout.double()).sum(), (qd, kd, vd))
        for a, b, name in zip(got, ref, "qkv"):
            gerr = (a.double() - b).abs().max().item()
            assert gerr <= 5e-4, f"{spec_node} {shape} {heads} {executor}: max |d{name} - oracle| {gerr:.3g}"
    RUN["cases"] += 1
    RUN["by_executor"][executor] = RUN["by_executor"].get(executor, 0) + 1


def test_fuzz_ran(capsys):
    """Runs after the fuzz (file order): it exercised both executors."""
    if RUN["cases"] == 0:
        pytest.skip("the fuzz test did not run in this session")
    with capsys.disabled():
        print(f"\nfuzz: {RUN['cases']} cases, by executor {RUN['by_executor']}")
    assert set(RUN["by_executor"]) == {"torch", "interpret"}
