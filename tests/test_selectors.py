"""Block selectors: the mask algebra of a selection, the torch reference selection, the Triton
estimation kernels (interpreter) against it, and attention under a selection against the dense
reference with the selected mask.

Tolerances: fp32 outputs atol 1e-5 and lse atol 1e-5 (the two launches of the Triton path merge
through their lse in fp32); fp16 outputs atol 2e-3. Block logits of the kernels and the
reference differ by summation order only (atol 1e-4); selections and tables are compared exactly,
built from the same logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import inputs, make_plan

from attncc.codegen.executors import run
from attncc.codegen.forward.reference import attention_reference
from attncc.codegen.selectors import launch as SLA
from attncc.codegen.selectors import layout as SL
from attncc.codegen.selectors import reference as SR
from attncc.codegen.selectors import run as S
from attncc.ir import masks as M
from attncc.ir.blocks import EMPTY
from attncc.ir.plan import AttentionPlan
from attncc.ir.selection import SelectorError, resolve_selector, split_program, substitute
from attncc.spec import SpecError, check_executable, load_spec


def sel(method: str, **params) -> M.Selector:
    return M.Selector(method, tuple(sorted(params.items())))


def plan_of(prog, **kw) -> AttentionPlan:
    """A selector-test plan: 2 query heads on 1 kv head, 100 tokens, 16-token blocks."""
    programs = prog if isinstance(prog, tuple) else (prog,)
    return make_plan(*programs, **{"kv_heads": 1, "q_len": 100, **kw})


def qkv(plan: AttentionPlan, batch: int = 1):
    return inputs(plan, batch)[:3]


def reference_with(plan: AttentionPlan, q, k, v, allowed):
    full = dataclasses.replace(plan, programs=(M.Full(),), head_to_program=(0,) * plan.num_heads, mask_kind="bool")
    return attention_reference(full, q, k, v, allowed)


TOPK = sel("topk", k=2)
STREAM_TOPK = M.All((M.Causal(), M.Any_((M.Sink(8), M.Window(15, 0), TOPK))))


# -- algebra ---------------------------------------------------------------------------------------
def test_split_keeps_static_parts_and_drops_dead_terms():
    split = split_program(STREAM_TOPK)
    assert split.selector == TOPK
    assert split.when_selected == M.Causal()
    assert split.when_not == M.All((M.Causal(), M.Any_((M.Sink(8), M.Window(15, 0)))))
    assert substitute(M.All((M.Causal(), TOPK)), TOPK, False) == M.Not(M.Full())


def test_two_different_selectors_in_one_program_are_refused():
    with pytest.raises(SelectorError, match="combines 2 different selectors"):
        split_program(M.Any_((TOPK, sel("threshold", tau=0.5))))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"k": 1, "block": 24}, "must be a multiple of the kernel block sizes"),
        ({"k": 1, "stride": 4}, "'stride' applies to score: antidiagonal only"),
        ({"k": 1, "score": "antidiagonal", "stride": 3}, "stride 3 must divide the selector block 16"),
        ({"k": 1, "score": "mean_pool", "pool": 4}, "'pool' applies to score: draft only"),
    ],
    ids=["block_not_multiple", "stride_wrong_score", "stride_not_dividing", "pool_wrong_score"],
)
def test_selector_parameters_are_checked(params, message):
    with pytest.raises(SelectorError, match=message):
        resolve_selector(sel("topk", **params), 16, 16)


def _eval(node: M.Mask, sel_tok: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """The algebra, evaluated node by node with the selector's dense value ``sel_tok``."""
    if isinstance(node, M.Selector):
        return sel_tok
    if isinstance(node, M.All):
        out = _eval(node.items[0], sel_tok, q_len, kv_len)
        for x in node.items[1:]:
            out = out & _eval(x, sel_tok, q_len, kv_len)
        return out
    if isinstance(node, M.Any_):
        out = _eval(node.items[0], sel_tok, q_len, kv_len)
        for x in node.items[1:]:
            out = out | _eval(x, sel_tok, q_len, kv_len)
        return out
    if isinstance(node, M.Not):
        return ~_eval(node.item, sel_tok, q_len, kv_len)
    return M.dense(node, q_len, kv_len)[0]


@pytest.mark.parametrize(
    "prog",
    [
        STREAM_TOPK,
        M.All((M.Causal(), TOPK)),
        M.All((M.Causal(), M.Not(M.All((TOPK, M.Window(40, 0)))))),
        M.Any_((M.Chunk(32), M.All((TOPK, M.Strided(3))))),
    ],
    ids=["streaming_or_topk", "causal_topk", "not_above_selector", "selector_inside_all"],
)
def test_dense_selected_mask_follows_the_algebra(prog):
    plan = plan_of(prog, heads=1, kv_heads=1, q_len=70)
    g = torch.Generator().manual_seed(1)
    nq = -(-70 // 16)
    selected = torch.rand(1, 1, nq, nq, generator=g) < 0.4
    got = SL.dense_selected_mask(plan, selected)[0, 0]
    tok = selected[0, 0].repeat_interleave(16, 0)[:70].repeat_interleave(16, 1)[:, :70]
    assert torch.equal(got, _eval(prog, tok, 70, 70))


# -- reference selection ---------------------------------------------------------------------------
def test_topk_takes_the_highest_logits_and_breaks_ties_by_lower_index():
    cfg = resolve_selector(sel("topk", k=2), 16, 16)
    logits = torch.tensor([[[[0.0, 3.0, 1.0, 3.0, 2.0]]]])
    cand = torch.tensor([[True, True, True, True, False]])
    assert SR.select_reference(logits, cand, cfg)[0, 0, 0].tolist() == [False, True, False, True, False]
    ties = torch.zeros(1, 1, 1, 5)
    assert SR.select_reference(ties, cand, cfg)[0, 0, 0].tolist() == [True, True, False, False, False]


def test_threshold_is_the_smallest_prefix_reaching_tau():
    cfg = resolve_selector(sel("threshold", tau=0.7), 16, 16)
    p = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = p.log().view(1, 1, 1, 4)
    cand = torch.ones(1, 4, dtype=torch.bool)
    # sorted masses 0.5, 0.25 (0.75 >= 0.7): two blocks
    assert SR.select_reference(logits, cand, cfg)[0, 0, 0].tolist() == [False, True, False, True]
    cfg_min = resolve_selector(sel("threshold", tau=0.1, min_blocks=3), 16, 16)
    assert SR.select_reference(logits, cand, cfg_min)[0, 0, 0].tolist() == [False, True, True, True]


# -- Triton kernels (interpreter) against the reference ---------------------------------------------
SELECTORS = {
    "topk_mean_pool": sel("topk", k=2),
    "topk_antidiagonal": sel("topk", k=3, score="antidiagonal", stride=4),
    "threshold_draft": sel("threshold", tau=0.8, score="draft", pool=8),
    "threshold_antidiagonal_block32": sel("threshold", tau=0.6, score="antidiagonal", block=32, min_blocks=1),
}


@pytest.mark.parametrize("name", list(SELECTORS))
def test_kernels_equal_reference(name):
    prog = M.All((M.Causal(), M.Any_((M.Sink(8), SELECTORS[name]))))
    plan = plan_of(prog, q_len=72)
    q, k, _ = qkv(plan, batch=2)
    lay = SL.layout(plan)
    cfg, cand = lay.configs[0], lay.candidates[0]
    kv_head = torch.arange(plan.num_heads) // plan.gqa_group
    qf_ref, kf_ref = SR.features_reference(q, cfg, True), SR.features_reference(k, cfg, False)
    qf, kf = SLA.features_triton(q, cfg, True, "interpret"), SLA.features_triton(k, cfg, False, "interpret")
    torch.testing.assert_close(qf, qf_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(kf, kf_ref, atol=1e-6, rtol=0)
    logits_ref = SR.block_logits_reference(qf, kf, kv_head, cand, cfg, plan.scale)
    logits = SLA.block_logits_triton(qf, kf, kv_head, cand, cfg, plan.scale, "interpret")
    assert torch.equal(torch.isinf(logits), ~cand.expand_as(logits))
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=0)
    # identical selections and tables from the same logits (ties included)
    for lg in (logits, logits.round()):
        assert torch.equal(SLA.select_triton(lg, cand, cfg, "interpret"), SR.select_reference(lg, cand, cfg))
    selected = S.select_blocks(plan, q, k, "interpret")
    assert selected.any()
    for got, want in zip(SLA.tables_triton(selected, lay, "interpret"), SR.tables_reference(selected, lay)):
        for f in ("kv_num_blocks", "kv_indices", "full_num_blocks", "full_indices"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_selection_stays_inside_candidates_and_k():
    plan = plan_of(STREAM_TOPK, q_len=130)
    q, k, _ = qkv(plan)
    selected = S.select_blocks(plan, q, k)
    lay = SL.layout(plan)
    cand = lay.candidates[0]
    assert not (selected & ~cand).any()
    assert torch.equal(selected.sum(-1), cand.sum(-1).clamp(max=2).expand(1, 2, -1))
    # the static parts keep their blocks: the mask holds the streaming blocks whatever is selected
    dense = SL.dense_selected_mask(plan, selected)
    static = M.dense(split_program(STREAM_TOPK).when_not, 130, 130)
    assert (dense | ~static).all() and not (dense & ~M.dense(M.Causal(), 130, 130)).any()
    # where the selection changes nothing, both label maps agree
    assert torch.equal(lay.labels_sel[0][~cand], lay.labels_not[0][~cand])


# -- attention under a selection ----------------------------------------------------------------------
CASES = {
    "topk_stream_gqa": (STREAM_TOPK, {"q_len": 90}),
    "threshold_antidiag_len77": (
        M.All((M.Causal(), M.Any_((M.Window(20, 0), sel("threshold", tau=0.5, score="antidiagonal", stride=4))))),
        {"q_len": 77},
    ),
    "draft_bidirectional_not": (M.Not(M.All((sel("topk", k=1, score="draft", pool=8), M.Strided(2)))), {"q_len": 64}),
}


@pytest.mark.parametrize("executor", ["torch", "interpret"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_equals_reference_with_selected_mask(case, executor):
    prog, kw = CASES[case]
    plan = plan_of(prog, **kw)
    q, k, v = qkv(plan)

    out, lse = run(plan, q, k, v, None, executor)
    selected = S.select_blocks(plan, q, k, "interpret" if executor == "interpret" else None)
    ref_out, ref_lse = reference_with(plan, q, k, v, SL.dense_selected_mask(plan, selected))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_interpret_fp16_with_model_mask_tensor_and_heads():
    prog_a = M.All((M.Causal(), M.Any_((M.Sink(16), sel("topk", k=1)))))
    plan = plan_of((prog_a, M.Causal()), heads=2, kv_heads=1, q_len=48, dtype="float16", head_to_program=(0, 1))
    plan = dataclasses.replace(plan, mask_kind="bool")
    q, k, v = qkv(plan)
    model_mask = torch.ones(1, 1, 48, 48, dtype=torch.bool)
    model_mask[..., 40:] = False
    selected = S.select_blocks(plan, q, k, "interpret")
    assert not selected[:, 1].any()
    out = run(plan, q, k, v, model_mask, "interpret")[0]
    ref = reference_with(plan, q, k, v, SL.dense_selected_mask(plan, selected) & model_mask)[0]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=0)


def test_candidates_exclude_blocks_the_static_part_keeps():
    plan = plan_of(STREAM_TOPK, q_len=100)
    cand = SL.layout(plan).candidates[0]
    allowed_static = M.dense(split_program(STREAM_TOPK).when_not, 100, 100)[0]
    nq = cand.shape[0]
    for i in range(nq):
        for j in range(nq):
            tile = allowed_static[i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16]
            causal = M.dense(M.Causal(), 100, 100)[0, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16]
            assert bool(cand[i, j]) == bool((causal & ~tile).any()), (i, j)
    assert SL.layout(plan).labels_sel[0].ne(EMPTY).sum() >= SL.layout(plan).labels_not[0].ne(EMPTY).sum()


# -- compile-time refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule, message",
    [
        (
            {"mask": {"any": [{"topk": {"k": 1}}, {"threshold": {"tau": 0.5}}]}},
            "rule 'dyn' uses the data-dependent selector 'topk'.*combines 2 different selectors",
        ),
        ({"mask": {"topk": {"k": 1, "block": 48}}}, "rule 'dyn' uses .*block 48 must be a multiple"),
        (
            {"mask": {"topk": {"k": 1}}, "permute": {"grid": [2, 4, 8], "tile": [1, 2, 2]}},
            "rule 'dyn' uses .*cannot be combined with a static permutation",
        ),
        (
            {"mask": {"topk": {"k": 1}}, "reuse": {"from": "dyn"}},
            "rule 'dyn' uses 'reuse' of a block selection .*cannot reuse its own selection",
        ),
    ],
    ids=["two_selectors", "block", "static_permutation", "reuse"],
)
def test_unsupported_selector_rules_fail_at_compile_time(rule, message):
    spec = load_spec({"attncc": 1, "rules": [dict(rule, name="dyn")]})
    with pytest.raises(SpecError, match=message):
        check_executable(spec, 0)


def test_executable_selector_rule_passes_the_check():
    spec = load_spec({"attncc": 1, "rules": [{"name": "ok", "mask": {"all": ["causal", {"topk": {"k": 2}}]}}]})
    check_executable(spec, 0)
