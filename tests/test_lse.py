"""The op's log-sum-exp (``attention(..., return_lse=True)``): two attentions over halves of the
keys merged through their log-sum-exps equal one attention over all keys (fp64 SDPA), values and
gradients (the lse's gradient reaches q and k)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan
from attncc.runtime.ops import attention


def test_merge_of_two_key_halves_through_lse():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64).float().requires_grad_(True)
    k = torch.randn(1, 2, 64, 16, generator=g).requires_grad_(True)
    v = torch.randn(1, 2, 64, 16, generator=g).requires_grad_(True)
    half = AttentionPlan.of(M.Full(), num_heads=2, q_len=40, kv_len=32, head_dim=16, block=16)
    o1, l1 = attention(half, q, k[:, :, :32], v[:, :, :32], executor="torch", return_lse=True)
    o2, l2 = attention(half, q, k[:, :, 32:], v[:, :, 32:], executor="torch", return_lse=True)
    lse = torch.logaddexp(l1, l2)
    out = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = F.scaled_dot_product_attention(qd, kd, vd)
    want_lse = torch.logsumexp((qd @ kd.transpose(-1, -2)) * 16**-0.5, -1)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)
    dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (out.double() * dout).sum().backward()
    (want * dout).sum().backward()
    for got, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)
