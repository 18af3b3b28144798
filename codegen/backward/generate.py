"""Backward kernel source for a plan: FlashAttention-2 style dK/dV and dQ kernels that recompute
P from the saved log-sum-exp and visit only the blocks the plan's block tables list."""

from __future__ import annotations

from attncc.codegen.forward.generate import emit_mask_predicate
from attncc.ir import masks as M
from attncc.ir.plan import AttentionPlan


def kernel_names(plan: AttentionPlan) -> dict[str, str]:
    """Names of the generated backward kernels, by role."""
    p = plan.pattern
    return {
        "preprocess": f"{p}_bwd_preprocess_kernel",
        "dkdv": f"{p}_bwd_dkdv_kernel",
        "dq": f"{p}_bwd_dq_kernel",
    }


#: run-time integers of the dK/dV and dQ kernels the JIT must not specialise on: a call at a new
#: length or offset reuses the compiled kernels (EVEN_Q / EVEN_KV stay constexprs)
RUNTIME_INTS = ("Q_LEN", "KV_LEN", "Q_OFFSET", "NUM_Q_BLOCKS", "NUM_KV_BLOCKS", "MAX_PARTIAL", "MAX_FULL")

_PREPROCESS = '''
@triton.jit(do_not_specialize=["Q_LEN"])
def {name}(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H: tl.constexpr, Q_LEN, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] in fp32, model token order."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, BLOCK_DV)  # [BDV]
    ok = (rows < Q_LEN)[:, None] & (cols < HEAD_DIM_V)[None, :]  # [BM, BDV]
    rows64 = rows.to(tl.int64)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + rows64[:, None] * stride_om + cols[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_dom + cols[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    # tl.reduce with the standard combine function is what tl.sum compiles to; the interpreter also
    # runs it when it was switched on after triton was imported (tl.sum itself it cannot)
    delta = tl.reduce(o * do, 1, _sum_combine)  # [BM]
    tl.store(Delta + off_bh * Q_LEN + rows64, delta, mask=rows < Q_LEN)
'''

_HELPERS = '''
@triton.jit
def _block_rows(block, Order, LEN, BLOCK: tl.constexpr, HAS_PERM: tl.constexpr):
    """(model rows [BLOCK] int64, in range [BLOCK]) of kernel block ``block``."""
    slots = block * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] kernel slots
    ok = slots < LEN
    if HAS_PERM:
        rows = tl.load(Order + slots, mask=ok, other=0).to(tl.int64)  # gather: slot -> model row
    else:
        rows = slots.to(tl.int64)
    return rows, ok


@triton.jit
def _load_rows(base, rows, ok, stride_row, DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """The [rows, BLOCK_DIM] tile of ``rows`` (last dim contiguous), zero outside; fp32 with UPCAST."""
    cols = tl.arange(0, BLOCK_DIM)
    x = tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=ok[:, None] & (cols < DIM)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(base, rows, ok, stride_row, x, DIM: tl.constexpr, BLOCK_DIM: tl.constexpr):
    cols = tl.arange(0, BLOCK_DIM)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], x.to(base.dtype.element_ty),
             mask=ok[:, None] & (cols < DIM)[None, :])


@triton.jit
def _row_stats(LSE, Delta, row_off, q_ok):
    """(lse, delta) [BM] of query rows; a row with no key (lse = -inf) gets +inf: its P is exactly 0."""
    lse = tl.load(LSE + row_off, mask=q_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row_off, mask=q_ok, other=0.0)
    return lse, delta


@triton.jit
def _probabilities(
    q, k, lse, q_rows, q_ok, kv_rows, kv_ok, off_b, off_h, prog,
    MaskT, stride_mb, stride_mh, stride_mm, stride_mn, sm_scale, KV_LEN, Q_OFFSET,
    APPLY_MASK: tl.constexpr, HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """P [BM, BN] = exp(scale q.k (+ the additive mask) - lse) where allowed, 0 elsewhere.
    APPLY_MASK is set for partial blocks only: full blocks skip the predicate and pay only for
    sequence-end and mask-tensor checks."""
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale  # [BM, BN]
    allowed = q_ok[:, None] & kv_ok[None, :]  # [BM, BN]
    if APPLY_MASK:
        allowed = allowed & _mask(q_rows[:, None] + Q_OFFSET, kv_rows[None, :], off_h, KV_LEN, prog)
{mask_tensor}    if APPLY_MASK or HAS_MASK_TENSOR or not (EVEN_Q and EVEN_KV):
        qk = tl.where(allowed, qk, float("-inf"))
    return tl.exp(qk - lse[:, None])
'''

# One (query block, kv block) pair of the dK/dV kernel.
_DKDV_STEP = """
@triton.jit
def {name}(
    dk, dv, k, v, kv_rows, kv_ok, q_block, off_b, off_h, prog,
    Q, DO, LSE, Delta, MaskT, QOrder,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    sm_scale,
    H: tl.constexpr, Q_LEN, KV_LEN, Q_OFFSET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, APPLY_MASK: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    q_rows, q_ok = _block_rows(q_block, QOrder, Q_LEN, BLOCK_M, HAS_PERM)  # [BM]
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, q_rows, q_ok, stride_qm,
                   HEAD_DIM, BLOCK_D, UPCAST)  # [BM, BD]
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, q_rows, q_ok, stride_dom,
                    HEAD_DIM_V, BLOCK_DV, UPCAST)  # [BM, BDV]
    lse, delta = _row_stats(LSE, Delta, (off_b * H + off_h) * Q_LEN + q_rows, q_ok)  # [BM]
    p = _probabilities(q, k, lse, q_rows, q_ok, kv_rows, kv_ok, off_b, off_h, prog,
                       MaskT, stride_mb, stride_mh, stride_mm, stride_mn, sm_scale, KV_LEN, Q_OFFSET,
                       APPLY_MASK, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, INPUT_PRECISION)  # [BM, BN]
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)  # [BN, BDV]
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [BM, BN]
    ds = p * (dp - delta[:, None])  # [BM, BN]
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)  # [BN, BD]
    return dk, dv
"""

#: the arguments both backward kernels share, around their outputs and the outputs' strides
_COMMON_HEAD = """\
    Q, K, V, DO, LSE, Delta, {outputs}, MaskT, QOrder, KVOrder, HeadProgram,
    PartialNum, PartialIdx, FullNum, FullIdx, Visits,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
"""
_COMMON_TAIL = """\
    sm_scale,
    H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr,
    Q_LEN, KV_LEN, Q_OFFSET, NUM_Q_BLOCKS, NUM_KV_BLOCKS, MAX_PARTIAL, MAX_FULL,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
):
"""

#: one walk of the dK/dV kernel over a transposed table row: partial or full query blocks
_DKDV_LOOP = """\
        n_{kind} = tl.load({counts} + table_row)
        for i in range(n_{kind}):
            q_block = tl.load({indices} + table_row * {width} + i).to(tl.int64)
            dk, dv = {step}(
                dk, dv, k, v, kv_rows, kv_ok, q_block, off_b, off_h, prog,
                Q, DO, LSE, Delta, MaskT, QOrder,
                stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                stride_mb, stride_mh, stride_mm, stride_mn,
                sm_scale, H, Q_LEN, KV_LEN, Q_OFFSET, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
                {apply_mask}, HAS_PERM, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, UPCAST, INPUT_PRECISION,
            )
            if COUNT_VISITS:
                tl.atomic_add(Visits + ((off_b * H + off_h) * NUM_Q_BLOCKS + q_block) * NUM_KV_BLOCKS + pid_n, 1)
"""

_DKDV = '''
@triton.jit(do_not_specialize={runtime_ints})
def {name}(
{common_head}    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
{common_tail}    """dK, dV of one kv block of one (batch, kv head): loops over the query heads sharing the kv
    head and, per head, over the partial then full query blocks of the transposed block table
    (PartialNum/PartialIdx, FullNum/FullIdx: [programs, NUM_KV_BLOCKS(, width)])."""
    tl.static_assert(H == H_KV * GROUP)
    pid_n = tl.program_id(0)
    off_bhkv = tl.program_id(1).to(tl.int64)
    off_b = off_bhkv // H_KV
    off_hkv = off_bhkv % H_KV
    kv_rows, kv_ok = _block_rows(pid_n, KVOrder, KV_LEN, BLOCK_N, HAS_PERM)  # [BN]
    k = _load_rows(K + off_b * stride_kb + off_hkv * stride_kh, kv_rows, kv_ok, stride_kn,
                   HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD]
    v = _load_rows(V + off_b * stride_vb + off_hkv * stride_vh, kv_rows, kv_ok, stride_vn,
                   HEAD_DIM_V, BLOCK_DV, UPCAST)  # [BN, BDV]
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)

    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        prog = tl.load(HeadProgram + off_h).to(tl.int64)
        table_row = prog * NUM_KV_BLOCKS + pid_n
{partial_loop}{full_loop}
    # scores are sm_scale * q.k, so dK picks up the scale once here
    dk = dk * sm_scale
    _store_rows(DK + off_b * stride_dkb + off_hkv * stride_dkh, kv_rows, kv_ok, stride_dkn, dk, HEAD_DIM, BLOCK_D)
    _store_rows(DV + off_b * stride_dvb + off_hkv * stride_dvh, kv_rows, kv_ok, stride_dvn, dv, HEAD_DIM_V, BLOCK_DV)
'''

_DQ_STEP = """
@triton.jit
def {name}(
    dq, q, do, lse, delta, q_rows, q_ok, kv_block, off_b, off_h, off_hkv, prog,
    K, V, MaskT, KVOrder,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    sm_scale,
    KV_LEN, Q_OFFSET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, APPLY_MASK: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    kv_rows, kv_ok = _block_rows(kv_block, KVOrder, KV_LEN, BLOCK_N, HAS_PERM)  # [BN]
    k = _load_rows(K + off_b * stride_kb + off_hkv * stride_kh, kv_rows, kv_ok, stride_kn,
                   HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD]
    v = _load_rows(V + off_b * stride_vb + off_hkv * stride_vh, kv_rows, kv_ok, stride_vn,
                   HEAD_DIM_V, BLOCK_DV, UPCAST)  # [BN, BDV]
    p = _probabilities(q, k, lse, q_rows, q_ok, kv_rows, kv_ok, off_b, off_h, prog,
                       MaskT, stride_mb, stride_mh, stride_mm, stride_mn, sm_scale, KV_LEN, Q_OFFSET,
                       APPLY_MASK, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, INPUT_PRECISION)  # [BM, BN]
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [BM, BN]
    ds = p * (dp - delta[:, None])  # [BM, BN]
    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)  # [BM, BD]
    return dq
"""

#: one walk of the dQ kernel over a forward table row: partial or full kv blocks
_DQ_LOOP = """\
    n_{kind} = tl.load({counts} + table_row)
    for i in range(n_{kind}):
        kv_block = tl.load({indices} + table_row * {width} + i).to(tl.int64)
        dq = {step}(
            dq, q, do, lse, delta, q_rows, q_ok, kv_block, off_b, off_h, off_hkv, prog,
            K, V, MaskT, KVOrder,
            stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_mb, stride_mh, stride_mm, stride_mn,
            sm_scale, KV_LEN, Q_OFFSET, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
            {apply_mask}, HAS_PERM, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, UPCAST, INPUT_PRECISION,
        )
        if COUNT_VISITS:
            tl.atomic_add(Visits + (off_bh * NUM_Q_BLOCKS + pid_m) * NUM_KV_BLOCKS + kv_block, 1)
"""

_DQ = '''
@triton.jit(do_not_specialize={runtime_ints})
def {name}(
{common_head}    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
{common_tail}    """dQ of one query block of one (batch, head): loops over the partial then full kv blocks of
    the forward block table (PartialNum/PartialIdx, FullNum/FullIdx: [programs, NUM_Q_BLOCKS(, width)])."""
    tl.static_assert(H == H_KV * GROUP)
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hkv = off_h // GROUP
    prog = tl.load(HeadProgram + off_h).to(tl.int64)
    q_rows, q_ok = _block_rows(pid_m, QOrder, Q_LEN, BLOCK_M, HAS_PERM)  # [BM]
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, q_rows, q_ok, stride_qm,
                   HEAD_DIM, BLOCK_D, UPCAST)  # [BM, BD]
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, q_rows, q_ok, stride_dom,
                    HEAD_DIM_V, BLOCK_DV, UPCAST)  # [BM, BDV]
    lse, delta = _row_stats(LSE, Delta, off_bh * Q_LEN + q_rows, q_ok)  # [BM]
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    table_row = prog * NUM_Q_BLOCKS + pid_m
{partial_loop}{full_loop}
    # scores are sm_scale * q.k, so dQ picks up the scale once here
    dq = dq * sm_scale
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, q_rows, q_ok, stride_dqm, dq, HEAD_DIM, BLOCK_D)
'''

#: the two walks of a table row: partial blocks (predicate evaluated), then full ones
_WALKS = {
    "partial_loop": dict(
        kind="partial", counts="PartialNum", indices="PartialIdx", width="MAX_PARTIAL", apply_mask="True"
    ),
    "full_loop": dict(kind="full", counts="FullNum", indices="FullIdx", width="MAX_FULL", apply_mask="False"),
}


def _kernel(template: str, loop: str, name: str, step: str, outputs: str) -> str:
    """A kernel template with its name, its arguments (``outputs``: its gradient pointers) and its
    two table walks (calling ``step``) filled in."""
    out = template.replace("{name}", name).replace("{common_head}", _COMMON_HEAD.replace("{outputs}", outputs))
    out = out.replace("{common_tail}", _COMMON_TAIL).replace("{runtime_ints}", repr(list(RUNTIME_INTS)))
    for key, fields in _WALKS.items():
        out = out.replace("{" + key + "}", loop.format(step=step, **fields))
    return out


#: the backward's reading of a score modification: (text in the helpers/steps, replacement)
_QK = "    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale  # [BM, BN]\n"
_MOD_POSITIONS = "    q_pos = q_rows[:, None] + Q_OFFSET  # [BM, 1] model positions\n"
_P_RETURN = "    return tl.exp(qk - lse[:, None])\n"
_DS = "    ds = p * (dp - delta[:, None])  # [BM, BN]\n"


#: the model's mask tensor in ``_probabilities`` (its ``{mask_tensor}``) ...
_MASK_TENSOR_STEP = """\
    if HAS_MASK_TENSOR:
        m_ptr = (MaskT + off_b * stride_mb + off_h * stride_mh
                 + q_rows[:, None] * stride_mm + kv_rows[None, :] * stride_mn)  # [BM, BN]
        m_val = tl.load(m_ptr, mask=q_ok[:, None] & kv_ok[None, :], other=0)
        if MASK_IS_BOOL:
            allowed = allowed & (m_val != 0)
        else:
            qk = qk + m_val.to(tl.float32)
"""
#: ... and for packed documents (MaskT: the document id of every key position)
_DOCUMENTS_STEP = """\
    if HAS_MASK_TENSOR:
        # packed documents: a query sees only the keys of its own document
        doc_q = tl.load(MaskT + off_b * stride_mb + (q_rows[:, None] + Q_OFFSET) * stride_mm,
                        mask=q_ok[:, None], other=-1)  # [BM, 1]
        doc_k = tl.load(MaskT + off_b * stride_mb + kv_rows[None, :] * stride_mn, mask=kv_ok[None, :], other=-2)
        allowed = allowed & (doc_q == doc_k)  # [BM, BN]
"""


def _with_score_mod(plan: AttentionPlan, helpers: str, steps: list[str]) -> tuple[str, list[str]]:
    """The helpers and steps with the plan's score modification: P recomputed from the modified
    scores and, under soft-capping, dS taken through the cap's derivative (1 - tanh^2)."""
    mod = plan.score_mod
    if mod is None:
        return helpers, steps
    assert helpers.count(_QK) == 1 and helpers.count(_P_RETURN) == 1
    if mod.softcap is None:
        call = "    qk = _score_mod(qk, q_pos, kv_rows[None, :], off_h, 1.0)  # [BM, BN]\n"
        return helpers.replace(_QK, _QK + _MOD_POSITIONS + call), steps
    call = "    qk, dmod = _score_mod_grad(qk, q_pos, kv_rows[None, :], off_h)  # [BM, BN] each\n"
    helpers = helpers.replace(_QK, _QK + _MOD_POSITIONS + call)
    helpers = helpers.replace(_P_RETURN, "    return tl.exp(qk - lse[:, None]), dmod\n")
    out = []
    for step in steps:
        assert step.count("    p = _probabilities(") == 1 and step.count(_DS) == 1
        step = step.replace("    p = _probabilities(", "    p, dmod = _probabilities(")
        out.append(
            step.replace(
                _DS, "    # through the soft-capping: d tanh\n    ds = p * (dp - delta[:, None]) * dmod  # [BM, BN]\n"
            )
        )
    return helpers, out


def backward_source(plan: AttentionPlan) -> str:
    """Python/Triton source of the backward kernels for ``plan``: a preprocess kernel
    (delta = rowsum(dout * out)), ``<pattern>_bwd_dkdv_kernel`` and ``<pattern>_bwd_dq_kernel``.

    Mask predicates are baked into the source; shapes, dtypes and flags are ``tl.constexpr``
    arguments of the kernels."""
    for prog in plan.programs:
        if prog.is_dynamic:
            raise M.MaskError(f"mask {prog} selects blocks at run time; the backward kernels need a static block table")
    p = plan.pattern
    names = kernel_names(plan)
    header = [
        f"# attncc backward kernels for pattern '{p}'",
        *(f"# {line}" for line in plan.describe_kernel().splitlines()),
        "# generated source: dQ and dK/dV recompute P = exp(scale * q.k - lse) per visited block",
        "import triton",
        "import triton.language as tl",
        "",
        "_sum_combine = tl.standard._sum_combine",
        "",
    ]
    parts = ["\n".join(header)]
    parts.append("\n" + emit_mask_predicate(plan))
    if plan.score_mod is not None:
        parts.append("\n" + plan.score_mod.triton_source(with_grad=plan.score_mod.softcap is not None))
    parts.append(_PREPROCESS.replace("{name}", names["preprocess"]))
    step = _DOCUMENTS_STEP if plan.mask_kind == "documents" else _MASK_TENSOR_STEP
    helpers = _HELPERS.replace("{mask_tensor}", step)
    helpers, (dkdv_step, dq_step) = _with_score_mod(plan, helpers, [_DKDV_STEP, _DQ_STEP])
    parts.append(helpers)
    parts.append(dkdv_step.replace("{name}", f"{p}_bwd_dkdv_step"))
    parts.append(_kernel(_DKDV, _DKDV_LOOP, names["dkdv"], f"{p}_bwd_dkdv_step", "DK, DV"))
    parts.append(dq_step.replace("{name}", f"{p}_bwd_dq_step"))
    parts.append(_kernel(_DQ, _DQ_LOOP, names["dq"], f"{p}_bwd_dq_step", "DQ"))
    return "\n".join(parts)
