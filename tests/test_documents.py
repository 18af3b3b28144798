"""Packed documents (attncc/ir/documents.py, codegen/documents.py): every executor's forward and
backward against fp64 attention whose mask is written here from the ids; the kernels visit only
block pairs whose documents meet; tables come from the ids, per batch element."""

from __future__ import annotations

import pytest
import torch
from support import inputs

from attncc.codegen import executors as E
from attncc.codegen.backward.launch import attention_bwd
from attncc.codegen.forward.launch import attention_fwd
from attncc.ir.documents import DocumentError
from attncc.ir.plan import AttentionPlan
from attncc.spec import parse_mask


def packed(lengths: list[int]) -> torch.Tensor:
    """Document ids of one packed row: document d repeated lengths[d] times."""
    return torch.cat([torch.full((n,), d, dtype=torch.int64) for d, n in enumerate(lengths)])


#: two rows with different packings (uneven lengths, a one-token document)
IDS = torch.stack([packed([30, 1, 50, 29]), packed([64, 46])])
MASKS = {
    "causal": (parse_mask("causal", {}), lambda q, k: k <= q),
    "window": (parse_mask({"all": ["causal", {"window": 12}]}, {}), lambda q, k: (k <= q) & (q - 12 < k)),
    "full": (parse_mask("full", {}), lambda q, k: torch.ones_like(q - k, dtype=torch.bool)),
}


def expected(q, k, v, ids, pred, scale):
    """fp64 attention over allowed = pred(q, k) & same document, written out (autograd: grads)."""
    h, hkv = q.shape[1], k.shape[1]
    kk, vv = (x.repeat_interleave(h // hkv, dim=1) for x in (k, v))
    n = q.shape[2]
    pos = torch.arange(n)
    allowed = pred(pos[:, None], pos[None, :]) & (ids[:, :, None] == ids[:, None, :])  # [B, S, S]
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(s, -1) @ vv


def plan_of(mask, n=110, **kw) -> AttentionPlan:
    return AttentionPlan.of(
        mask, num_heads=4, num_kv_heads=2, q_len=n, head_dim=16, block=16, mask_kind="documents", **kw
    )


@pytest.mark.parametrize("executor", ["interpret", "torch", "reference"])
@pytest.mark.parametrize("case", sorted(MASKS))
def test_forward_and_backward_match_fp64(executor, case):
    mask, pred = MASKS[case]
    plan = plan_of(mask)
    q, k, v, _ = inputs(plan, batch=2, seed=5)
    out, lse = E.run(plan, q, k, v, IDS, executor=executor)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = expected(qd, kd, vd, IDS, pred, plan.scale)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=0)
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    grads = E.run_backward(plan, q, k, v, out, lse, dout, mask=IDS, executor=executor)
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)


def test_kernels_visit_only_blocks_whose_documents_meet():
    """Forward and both backward kernels: per batch element, the visited tile pairs are exactly
    the causal pairs whose id ranges meet (a packing of sorted ids: they meet iff they share one)."""
    mask, _ = MASKS["causal"]
    plan = plan_of(mask, n=128)
    ids = torch.stack([packed([16, 40, 8, 64]), packed([128])])
    q, k, v, _ = inputs(plan, batch=2, seed=6)
    nb = 128 // 16
    visits = torch.zeros(2 * 4, nb, dtype=torch.int32)
    out, lse = attention_fwd(plan, q, k, v, ids, target="interpret", visits=visits)
    blocks = torch.arange(128) // 16
    for b in range(2):
        same = ids[b][:, None] == ids[b][None, :]
        causal = torch.arange(128)[:, None] >= torch.arange(128)[None, :]
        pairs = torch.zeros(nb, nb, dtype=torch.bool)
        pairs[blocks[:, None].expand(128, 128)[same & causal], blocks[None, :].expand(128, 128)[same & causal]] = True
        want = pairs.sum(1).to(torch.int32)
        assert torch.equal(visits[b * 4 : (b + 1) * 4], want.expand(4, nb)), (b, visits[b * 4], want)
        seen: dict = {}
        attention_bwd(
            plan,
            q[b : b + 1],
            k[b : b + 1],
            v[b : b + 1],
            out[b : b + 1],
            lse[b : b + 1],
            torch.ones_like(out[b : b + 1]),
            ids[b : b + 1],
            target="interpret",
            visits=seen,
        )
        for role in ("dkdv", "dq"):
            assert torch.equal(seen[role][0, 0].bool(), pairs), role
    # the first row's documents leave most of the causal blocks out
    assert int(visits[0].sum()) < int(visits[4].sum())


def test_unsorted_ids_are_exact():
    """Ids need not be sorted or contiguous: a document split in two parts still sees itself."""
    mask, pred = MASKS["full"]
    plan = plan_of(mask, n=64)
    ids = torch.tensor([0] * 16 + [1] * 16 + [0] * 16 + [2] * 16).expand(2, 64)
    q, k, v, _ = inputs(plan, batch=2, seed=7)
    out, _ = E.run(plan, q, k, v, ids, executor="interpret")
    ref = expected(q.double(), k.double(), v.double(), ids, pred, plan.scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "ids,why",
    [
        (torch.zeros(2, 50, dtype=torch.int64), "expected \\[2, 110\\]"),
        (torch.zeros(2, 110), "integer"),
        (torch.zeros(3, 110, dtype=torch.int64), "expected \\[2, 110\\]"),
    ],
    ids=["short", "float", "batch"],
)
def test_bad_ids_are_refused(ids, why):
    plan = plan_of(MASKS["causal"][0])
    q, k, v, _ = inputs(plan, batch=2)
    with pytest.raises(DocumentError, match=why):
        E.run(plan, q, k, v, ids, executor="interpret")


def test_documents_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="no permutation"):
        from attncc.ir.permute import TilePermutation

        plan_of(MASKS["full"][0], n=64, permute=TilePermutation((4, 4, 4), (2, 2, 2)))
