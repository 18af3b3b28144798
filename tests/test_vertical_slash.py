"""The vertical-slash selector: its block set equals MInference's estimate (written out here
as MInference writes it, ``minference/modules/minference_forward.py``, then taken to blocks by
plain loops), and attention under it equals fp64 attention under the dense mask of the selected
blocks and causal; bad parameters are refused.

Tolerances: fp32 outputs and lse atol 1e-5 against the fp64 oracle (the Triton path merges two
launches through their lse in fp32).
"""

from __future__ import annotations

import math

import pytest
import torch
from support import inputs, make_plan

from attncc.codegen.executors import run
from attncc.codegen.selectors import reference as SR
from attncc.codegen.selectors import run as S
from attncc.codegen.selectors.vertical_slash import vertical_slash_blocks
from attncc.ir import masks as M
from attncc.ir.selection import SelectorError, resolve_selector
from attncc.spec import SpecError, check_executable, load_spec


def vs(**params) -> M.Selector:
    return M.Selector("vertical_slash", tuple(sorted(params.items())))


def sum_all_diagonal_matrix(mat: torch.Tensor) -> torch.Tensor:
    """MInference's diagonal sums of ``mat [1, 1, n, m]``: entry ``t`` sums the diagonal
    ``key - row = t + 1 - n``."""
    b, h, n, m = mat.shape
    zero_mat = torch.zeros((b, h, n, n), dtype=mat.dtype)
    mat_padded = torch.cat((zero_mat, mat, zero_mat), -1)
    mat_strided = mat_padded.as_strided((1, 1, n, n + m), (1, n * (2 * n + m), 2 * n + m + 1, 1))
    return torch.sum(mat_strided, 2)[:, :, 1:]


def minference_tokens(q, k, vertical_size, slash_size, last_q, keep_first, keep_recent, scale):
    """One head, queries bottom-right among the keys: MInference's kept key columns and kept
    diagonals ``q - kv`` as Python sets (its ``vertical_and_slash_kernel``, sizes given)."""
    q_len, kv_len = q.shape[0], k.shape[0]
    last_q = min(last_q, q_len)
    qk = torch.einsum("bhmk, bhnk -> bhmn", q[None, None, -last_q:], k[None, None]) * scale
    arange = torch.arange(last_q)
    last_q_mask = arange[:, None] >= arange[None, :]
    qk[:, :, :, -last_q:] = torch.where(last_q_mask, qk[:, :, :, -last_q:], -torch.inf)
    qk = torch.nn.functional.softmax(qk, dim=-1, dtype=torch.float32)
    vertical = qk.sum(-2, keepdim=True)
    vertical[..., :keep_first] = torch.inf
    vertical_topk = torch.topk(vertical, min(kv_len, vertical_size), -1).indices
    # MInference slices [..., :-last_q + 1]: the same kv_len entries (and still right for last_q 1)
    slash = sum_all_diagonal_matrix(qk)[..., :kv_len]
    slash[..., -keep_recent:] = torch.inf
    # entry t of the kv_len last diagonal sums is the diagonal q - kv = kv_len - 1 - t
    slash = (kv_len - 1) - torch.topk(slash, min(kv_len, slash_size), -1).indices
    return set(vertical_topk.flatten().tolist()), set(slash.flatten().tolist())


def blocks_of(columns, diagonals, q_len, kv_len, block):
    """``[nI, nJ]`` bool: block pairs holding a kept column or a causal pair on a kept diagonal."""
    offset = kv_len - q_len
    ni, nj = -(-q_len // block), -(-kv_len // block)
    out = torch.zeros(ni, nj, dtype=torch.bool)
    for i in range(ni):
        rows = range(i * block, min((i + 1) * block, q_len))
        for j in range(nj):
            cols = range(j * block, min((j + 1) * block, kv_len))
            out[i, j] = any(c in columns for c in cols) or any(offset + r - c in diagonals for r in rows for c in cols)
    return out


def causal_blocks(q_len, kv_len, block):
    offset = kv_len - q_len
    ni, nj = -(-q_len // block), -(-kv_len // block)
    i, j = torch.arange(ni)[:, None], torch.arange(nj)[None, :]
    return j * block <= offset + torch.clamp((i + 1) * block, max=q_len) - 1


def expected_blocks(plan, q, k, params, block):
    """``[B, H, nI, nJ]``: MInference's estimate per (batch, head), restricted to causal blocks."""
    b, h = q.shape[:2]
    p = {"last_q": 64, "keep_first": 30, "keep_recent": 100, **params}
    out = torch.zeros(b, h, -(-plan.q_len // block), -(-plan.kv_len // block), dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            kk = k[bb, hh // plan.gqa_group]
            cols, diags = minference_tokens(
                q[bb, hh].float(), kk.float(), p["vertical"], p["slash"], p["last_q"], p["keep_first"],
                p["keep_recent"], plan.scale,
            )  # fmt: skip
            out[bb, hh] = blocks_of(cols, diags, plan.q_len, plan.kv_len, block)
    return out & causal_blocks(plan.q_len, plan.kv_len, block)


# sizes with vertical >= keep_first and slash >= keep_recent: MInference's top-k then picks every
# forced entry (its +inf ties are otherwise broken arbitrarily)
CASES = {
    "len130_gqa": (130, 130, {"vertical": 6, "slash": 10, "last_q": 16, "keep_first": 2, "keep_recent": 4}),
    "len200_defaults_scaled": (200, 200, {"vertical": 9, "slash": 12, "last_q": 64, "keep_first": 3, "keep_recent": 5}),
    "q_len_below_last_q": (40, 40, {"vertical": 5, "slash": 6, "last_q": 64, "keep_first": 1, "keep_recent": 2}),
    "chunk_after_cache": (48, 150, {"vertical": 7, "slash": 9, "last_q": 32, "keep_first": 2, "keep_recent": 3}),
}


def plan_for_case(case, **kw):
    q_len, kv_len, params = CASES[case]
    prog = M.All((M.Causal(), vs(**params, block=16)))
    # queries bottom-right among the keys (a chunk after a cache), as MInference places them
    plan = make_plan(prog, heads=2, kv_heads=1, q_len=q_len, kv_len=kv_len, q_positions="end", **kw)
    return plan, params


@pytest.mark.parametrize("case", list(CASES))
def test_selected_blocks_equal_minference_estimate(case):
    plan, params = plan_for_case(case)
    q, k, _, _ = inputs(plan, batch=2, seed=3)
    want = expected_blocks(plan, q, k, params, 16)
    got = S.select_blocks(plan, q, k)
    assert got.any() and not got.all()
    assert torch.equal(got, want)
    # the run path (prefix sums over diagonals) and the dense reference agree before the causal cut
    cfg = resolve_selector(vs(**params, block=16), 16, 16)
    kv_head = torch.arange(2) // plan.gqa_group
    dense = SR.vertical_slash_reference(q, k, kv_head, cfg, plan.scale, plan.q_offset)
    assert torch.equal(vertical_slash_blocks(q, k, kv_head, cfg, plan.scale, plan.q_offset), dense)


def test_selector_block_coarser_than_kernel_block():
    params = {"vertical": 4, "slash": 6, "last_q": 8, "keep_first": 1, "keep_recent": 2}
    plan = make_plan(M.All((M.Causal(), vs(**params, block=32))), heads=1, q_len=100)
    q, k, _, _ = inputs(plan, seed=5)
    want32 = expected_blocks(plan, q, k, params, 32)[0, 0]
    got = S.select_blocks(plan, q, k)[0, 0]  # 16-token kernel blocks
    rows, cols = torch.arange(got.shape[0]) // 2, torch.arange(got.shape[1]) // 2
    assert torch.equal(got, want32[rows][:, cols])


def fp64_attention(q, k, v, allowed, scale):
    """Plain fp64 softmax attention where ``allowed [B, H, Sq, Skv]``; rows with no key: 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1))
    return torch.matmul(p, vv), lse


@pytest.mark.parametrize("executor", ["reference", "torch", "interpret"])
@pytest.mark.parametrize("case", ["len130_gqa", "q_len_below_last_q", "chunk_after_cache"])
def test_attention_equals_fp64_under_selected_blocks_and_causal(case, executor):
    plan, params = plan_for_case(case)
    q, k, v, _ = inputs(plan, seed=7)
    blocks = expected_blocks(plan, q, k, params, 16)
    tokens = blocks.repeat_interleave(16, -2)[..., : plan.q_len, :].repeat_interleave(16, -1)[..., : plan.kv_len]
    offset = plan.kv_len - plan.q_len
    causal = torch.arange(plan.kv_len)[None, :] <= offset + torch.arange(plan.q_len)[:, None]
    want_out, want_lse = fp64_attention(q, k, v, tokens & causal, plan.scale)
    out, lse = run(plan, q, k, v, None, executor)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)


def test_streaming_or_vertical_slash_keeps_the_static_blocks():
    params = {"vertical": 3, "slash": 4, "last_q": 8, "keep_first": 1, "keep_recent": 1}
    prog = M.All((M.Causal(), M.Any_((M.Sink(16), M.Window(16, 0), vs(**params, block=16)))))
    plan = make_plan(prog, heads=1, q_len=96)
    q, k, v, _ = inputs(plan, seed=2)
    blocks = expected_blocks(plan, q, k, params, 16)
    tokens = blocks.repeat_interleave(16, -2)[..., :96, :].repeat_interleave(16, -1)[..., :96]
    i, j = torch.arange(96)[:, None], torch.arange(96)[None, :]
    allowed = (j <= i) & (tokens | (j < 16) | (i - j <= 16))  # Window(16, 0): 16 keys before the query
    want_out, _ = fp64_attention(q, k, v, allowed, plan.scale)
    for executor in ("torch", "interpret"):
        torch.testing.assert_close(run(plan, q, k, v, None, executor)[0].double(), want_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "mask, message",
    [
        ({"vertical_slash": {"vertical": 0, "slash": 8}}, "vertical_slash.vertical must be >= 1"),
        ({"vertical_slash": {"vertical": 8}}, "vertical_slash needs 'slash'"),
        ({"vertical_slash": {"vertical": 8, "slash": 8, "last_q": 0}}, "vertical_slash.last_q must be >= 1"),
        ({"vertical_slash": {"vertical": 8, "slash": 8, "keep_first": -1}}, "vertical_slash.keep_first must be >= 0"),
        ({"vertical_slash": {"vertical": 8, "slash": 8, "score": "mean_pool"}}, "unknown key 'score'"),
        ({"vertical_slash": [8, 8]}, "vertical_slash takes a mapping of parameters"),
    ],
    ids=["vertical_zero", "no_slash", "last_q_zero", "keep_first_negative", "score_key", "not_mapping"],
)
def test_bad_parameters_are_refused_at_their_key(mask, message):
    with pytest.raises(SpecError, match=message):
        load_spec({"attncc": 1, "rules": [{"mask": {"all": ["causal", mask]}}]})


def test_block_not_a_multiple_and_runtime_permutation_are_refused():
    with pytest.raises(SelectorError, match="block 24 must be a multiple of the kernel block sizes"):
        resolve_selector(vs(vertical=4, slash=4, block=24), 16, 16)
    spec = load_spec(
        {
            "attncc": 1,
            "rules": [
                {
                    "name": "vs",
                    "mask": {"all": ["causal", {"vertical_slash": {"vertical": 4, "slash": 4}}]},
                    "permute": {"by": "key_importance", "segment": 128},
                }
            ],
        }
    )
    with pytest.raises(SpecError, match="vertical_slash selector ranks key columns and diagonals"):
        check_executable(spec, 0)
    ok = {"mask": {"all": ["causal", {"vertical_slash": {"vertical": 4, "slash": 4}}]}}
    check_executable(load_spec({"attncc": 1, "rules": [ok]}), 0)
