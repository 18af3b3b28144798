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
    # not a function of q - kv alone: the CPU path classifies blocks over the ids
    "sink_window": (
        parse_mask({"all": ["causal", {"any": [{"sink": 4}, {"window": 12}]}]}, {}),
        lambda q, k: (k <= q) & ((k < 4) | (q - 12 < k)),
    ),
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


def check_forward_and_backward(plan, q, k, v, ids, pred, executor) -> None:
    """The executor's output and gradients against :func:`expected` (fp64, autograd)."""
    out, lse = E.run(plan, q, k, v, ids, executor=executor)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = expected(qd, kd, vd, ids, pred, plan.scale)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=0)
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    grads = E.run_backward(plan, q, k, v, out, lse, dout, mask=ids, executor=executor)
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)


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
    check_forward_and_backward(plan, q, k, v, IDS, pred, executor)


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


@pytest.mark.parametrize("executor", ["interpret", "torch"])
def test_unsorted_ids_are_exact(executor):
    """Ids need not be sorted or contiguous: a document split in two parts still sees itself."""
    mask, pred = MASKS["full"]
    plan = plan_of(mask, n=64)
    ids = torch.tensor([0] * 16 + [1] * 16 + [0] * 16 + [2] * 16).expand(2, 64)
    q, k, v, _ = inputs(plan, batch=2, seed=7)
    check_forward_and_backward(plan, q, k, v, ids, pred, executor)


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


# -- documents recovered from models -----------------------------------------------------------

FULL = {"attncc": 1, "block_size": 16, "rules": [{"mask": "full"}]}
LENGTHS = [20, 33, 27]


def _packed_llama(impl: str, train: bool = False):
    from support import tiny_llama

    model = tiny_llama(layers=2, impl=impl, train=train)
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    ids = torch.randint(0, 64, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(0))
    return model, ids, pos


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("path", ["compile", "apply"])
def test_packed_llama_is_exact_forward_and_backward(impl, path):
    """Three documents packed in one row through ``position_ids`` (as Hugging Face's flattening
    collator makes them): logits and every parameter gradient equal the uncompiled model's, and
    each document's logits equal that document run alone."""
    pytest.importorskip("transformers")
    import attncc

    model, ids, pos = _packed_llama(impl, train=True)
    want = model(ids, position_ids=pos, use_cache=False).logits
    want.square().mean().backward()
    want_grads = _grads(model)
    model.zero_grad()
    with torch.no_grad():
        starts = [0, 20, 53]
        alone = torch.cat([model(ids[:, a : a + n], use_cache=False).logits for a, n in zip(starts, LENGTHS)], 1)
    torch.testing.assert_close(want, alone, atol=1e-5, rtol=0)
    kinds = []
    with E.observing(lambda plan, mask, sel: kinds.append(plan.mask_kind)):
        if path == "compile":
            torch._dynamo.reset()
            opts = {"spec": FULL, "strict": True, "executor": "interpret", "inner": "eager"}
            got = torch.compile(model, backend="attncc", options=opts)(ids, position_ids=pos, use_cache=False).logits
        else:
            attncc.apply(model, spec=FULL, strict=True, executor="interpret")
            got = model(ids, position_ids=pos, use_cache=False).logits
    got.square().mean().backward()
    if path == "apply":
        attncc.apply(model, spec=None)
    torch._dynamo.reset()
    assert kinds == ["documents", "documents"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(_grads(model), want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_explain_reports_the_document_density():
    pytest.importorskip("transformers")
    import attncc

    model, ids, pos = _packed_llama("sdpa")
    report = attncc.explain(model, ids, position_ids=pos, use_cache=False, spec=FULL)
    n = sum(LENGTHS)
    density = sum(k * (k + 1) // 2 for k in LENGTHS) / n**2  # causal within each document
    assert [s.density[0] for s in report.sites] == pytest.approx([density] * 2, abs=1e-4)
    assert all((s.model_mask, s.runtime_mask) == ("causal", "documents") for s in report.sites)


class SegmentMask(torch.nn.Module):
    """SDPA with a mask written from segment ids (and causal): the same-document mask, or masks of
    segment ids that are not documents -- ordered ids, and masks that agree with "same document"
    on ordinary ids but not on all (a negative id as a global token, ids compared modulo 256 or
    through int8, huge ids as padding that sees everything)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, seg):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        a, b = seg[:, None, :, None], seg[:, None, None, :]
        m = {
            "documents": lambda: a == b,
            "ordered": lambda: a >= b,
            "negative_global": lambda: (a == b) | (b < 0),
            "modulo": lambda: (a % 256) == (b % 256),
            "int8": lambda: a.to(torch.int8) == b.to(torch.int8),
            "padding_sees_all": lambda: (a == b) | (a >= 10000),
        }[self.kind]()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m & causal)


@pytest.mark.parametrize("kind,expect", [("documents", "documents"), ("ordered", "bool")])
def test_segment_masks(kind, expect):
    """The same-document mask becomes documents; a mask of segment ids that is something else
    stays the run-time bool tensor it was; both exact."""
    import attncc

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 4, 96, 16, generator=g) for _ in range(3))
    seg = torch.stack([packed([30, 40, 26]), packed([96])])
    model = SegmentMask(kind)
    want = model(q, k, v, seg)
    torch._dynamo.reset()
    got = torch.compile(model, backend="attncc", options={"spec": FULL, "strict": True})(q, k, v, seg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (site,) = attncc.explain(model, q, k, v, seg, spec=FULL).sites
    assert site.runtime_mask == expect


@pytest.mark.parametrize("kind", ["negative_global", "modulo", "int8", "padding_sees_all"])
def test_masks_that_only_look_like_documents_stay_tensors(kind):
    import attncc

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    ordinary = packed([20, 30, 14]).unsqueeze(0)
    model = SegmentMask(kind)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attncc", options={"spec": FULL, "strict": True})
    torch.testing.assert_close(compiled(q, k, v, ordinary), model(q, k, v, ordinary), atol=1e-5, rtol=0)
    # ids where the mask is not "same document": the answer still is the model's
    tricky = ordinary.clone()
    tricky[0, :3] = -1
    tricky[0, 40:] = 10000 if kind == "padding_sees_all" else 256
    torch.testing.assert_close(compiled(q, k, v, tricky), model(q, k, v, tricky), atol=1e-5, rtol=0)
    (site,) = attncc.explain(model, q, k, v, ordinary, spec=FULL).sites
    assert site.runtime_mask == "bool"


def test_ids_that_differ_above_32_bits_stay_different():
    mask, pred = MASKS["causal"]
    plan = plan_of(mask, n=32)
    ids = torch.tensor([[0] * 8 + [2**32] * 24])
    q, k, v, _ = inputs(plan, seed=10)
    out, _ = E.run(plan, q, k, v, ids, executor="interpret")
    ref = expected(q.double(), k.double(), v.double(), ids, pred, plan.scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
