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


_PREPROCESS = '''
@triton.jit
def {name}(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM_V: tl.constexpr,
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

# One (query block, kv block) pair of the dK/dV kernel. APPLY_MASK is set for partial blocks
# only: full blocks skip the predicate and pay only for sequence-end and mask-tensor checks.
_DKDV_STEP = """
@triton.jit
def {name}(
    dk, dv, k, v, kv_rows, kv_ok, q_block, off_b, off_h, prog,
    Q, DO, LSE, Delta, MaskT, QOrder,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    sm_scale,
    H: tl.constexpr, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr, Q_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, APPLY_MASK: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    q_slots = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] kernel slots
    q_ok = q_slots < Q_LEN
    if HAS_PERM:
        q_rows = tl.load(QOrder + q_slots, mask=q_ok, other=0).to(tl.int64)  # [BM] model rows
    else:
        q_rows = q_slots.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + q_rows[:, None] * stride_qm + d[None, :],
                mask=q_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BM, BD]
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + q_rows[:, None] * stride_dom + dv_cols[None, :],
                 mask=q_ok[:, None] & (dv_cols < HEAD_DIM_V)[None, :], other=0.0)  # [BM, BDV]
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_off = (off_b * H + off_h) * Q_LEN + q_rows
    lse = tl.load(LSE + row_off, mask=q_ok, other=float("inf"))  # [BM]
    # a row with no key has lse = -inf and zero gradient: +inf makes its P exactly 0
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row_off, mask=q_ok, other=0.0)  # [BM]

    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale  # [BM, BN]
    allowed = q_ok[:, None] & kv_ok[None, :]  # [BM, BN]
    if APPLY_MASK:
        allowed = allowed & _mask(q_rows[:, None] + Q_OFFSET, kv_rows[None, :], off_h, KV_LEN, prog)
    if HAS_MASK_TENSOR:
        m_ptr = (MaskT + off_b * stride_mb + off_h * stride_mh
                 + q_rows[:, None] * stride_mm + kv_rows[None, :] * stride_mn)  # [BM, BN]
        m_val = tl.load(m_ptr, mask=q_ok[:, None] & kv_ok[None, :], other=0)
        if MASK_IS_BOOL:
            allowed = allowed & (m_val != 0)
        else:
            qk = qk + m_val.to(tl.float32)
    if APPLY_MASK or HAS_MASK_TENSOR or not (EVEN_Q and EVEN_KV):
        qk = tl.where(allowed, qk, float("-inf"))
    p = tl.exp(qk - lse[:, None])  # [BM, BN]
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)  # [BN, BDV]
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [BM, BN]
    ds = p * (dp - delta[:, None])  # [BM, BN]
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)  # [BN, BD]
    return dk, dv
"""

_DKDV = '''
@triton.jit
def {name}(
    Q, K, V, DO, LSE, Delta, DK, DV, MaskT, QOrder, KVOrder, HeadProgram,
    PartialNum, PartialIdx, FullNum, FullIdx, Visits,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    sm_scale,
    H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr,
    Q_LEN: tl.constexpr, KV_LEN: tl.constexpr, Q_OFFSET: tl.constexpr,
    NUM_Q_BLOCKS: tl.constexpr, NUM_KV_BLOCKS: tl.constexpr, MAX_PARTIAL: tl.constexpr, MAX_FULL: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
):
    """dK, dV of one kv block of one (batch, kv head): loops over the query heads sharing the kv
    head and, per head, over the partial then full query blocks of the transposed block table
    (PartialNum/PartialIdx, FullNum/FullIdx: [programs, NUM_KV_BLOCKS(, width)])."""
    tl.static_assert(H == H_KV * GROUP)
    pid_n = tl.program_id(0)
    off_bhkv = tl.program_id(1).to(tl.int64)
    off_b = off_bhkv // H_KV
    off_hkv = off_bhkv % H_KV

    kv_slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] kernel slots
    kv_ok = kv_slots < KV_LEN
    if HAS_PERM:
        kv_rows = tl.load(KVOrder + kv_slots, mask=kv_ok, other=0).to(tl.int64)  # [BN] model rows
    else:
        kv_rows = kv_slots.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + kv_rows[:, None] * stride_kn + d[None, :],
                mask=kv_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BN, BD]
    v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + kv_rows[:, None] * stride_vn + dv_cols[None, :],
                mask=kv_ok[:, None] & (dv_cols < HEAD_DIM_V)[None, :], other=0.0)  # [BN, BDV]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)

    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        prog = tl.load(HeadProgram + off_h).to(tl.int64)
        table_row = prog * NUM_KV_BLOCKS + pid_n
        n_partial = tl.load(PartialNum + table_row)
        for i in range(n_partial):
            q_block = tl.load(PartialIdx + table_row * MAX_PARTIAL + i).to(tl.int64)
            dk, dv = {step}(
                dk, dv, k, v, kv_rows, kv_ok, q_block, off_b, off_h, prog,
                Q, DO, LSE, Delta, MaskT, QOrder,
                stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                stride_mb, stride_mh, stride_mm, stride_mn,
                sm_scale, H, Q_LEN, KV_LEN, Q_OFFSET, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
                True, HAS_PERM, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, UPCAST, INPUT_PRECISION,
            )
            if COUNT_VISITS:
                tl.atomic_add(Visits + ((off_b * H + off_h) * NUM_Q_BLOCKS + q_block) * NUM_KV_BLOCKS + pid_n, 1)
        n_full = tl.load(FullNum + table_row)
        for i in range(n_full):
            q_block = tl.load(FullIdx + table_row * MAX_FULL + i).to(tl.int64)
            dk, dv = {step}(
                dk, dv, k, v, kv_rows, kv_ok, q_block, off_b, off_h, prog,
                Q, DO, LSE, Delta, MaskT, QOrder,
                stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                stride_mb, stride_mh, stride_mm, stride_mn,
                sm_scale, H, Q_LEN, KV_LEN, Q_OFFSET, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
                False, HAS_PERM, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, UPCAST, INPUT_PRECISION,
            )
            if COUNT_VISITS:
                tl.atomic_add(Visits + ((off_b * H + off_h) * NUM_Q_BLOCKS + q_block) * NUM_KV_BLOCKS + pid_n, 1)

    # scores are sm_scale * q.k, so dK picks up the scale once here
    dk = dk * sm_scale
    store_ok = kv_ok[:, None]
    tl.store(DK + off_b * stride_dkb + off_hkv * stride_dkh + kv_rows[:, None] * stride_dkn + d[None, :],
             dk.to(DK.dtype.element_ty), mask=store_ok & (d < HEAD_DIM)[None, :])
    tl.store(DV + off_b * stride_dvb + off_hkv * stride_dvh + kv_rows[:, None] * stride_dvn + dv_cols[None, :],
             dv.to(DV.dtype.element_ty), mask=store_ok & (dv_cols < HEAD_DIM_V)[None, :])
'''

_DQ_STEP = """
@triton.jit
def {name}(
    dq, q, do, lse, delta, q_rows, q_ok, kv_block, off_b, off_h, off_hkv, prog,
    K, V, MaskT, KVOrder,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    sm_scale,
    KV_LEN: tl.constexpr, Q_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, APPLY_MASK: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    kv_slots = kv_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] kernel slots
    kv_ok = kv_slots < KV_LEN
    if HAS_PERM:
        kv_rows = tl.load(KVOrder + kv_slots, mask=kv_ok, other=0).to(tl.int64)  # [BN] model rows
    else:
        kv_rows = kv_slots.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + kv_rows[:, None] * stride_kn + d[None, :],
                mask=kv_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BN, BD]
    v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + kv_rows[:, None] * stride_vn + dv_cols[None, :],
                mask=kv_ok[:, None] & (dv_cols < HEAD_DIM_V)[None, :], other=0.0)  # [BN, BDV]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale  # [BM, BN]
    allowed = q_ok[:, None] & kv_ok[None, :]  # [BM, BN]
    if APPLY_MASK:
        allowed = allowed & _mask(q_rows[:, None] + Q_OFFSET, kv_rows[None, :], off_h, KV_LEN, prog)
    if HAS_MASK_TENSOR:
        m_ptr = (MaskT + off_b * stride_mb + off_h * stride_mh
                 + q_rows[:, None] * stride_mm + kv_rows[None, :] * stride_mn)  # [BM, BN]
        m_val = tl.load(m_ptr, mask=q_ok[:, None] & kv_ok[None, :], other=0)
        if MASK_IS_BOOL:
            allowed = allowed & (m_val != 0)
        else:
            qk = qk + m_val.to(tl.float32)
    if APPLY_MASK or HAS_MASK_TENSOR or not (EVEN_Q and EVEN_KV):
        qk = tl.where(allowed, qk, float("-inf"))
    p = tl.exp(qk - lse[:, None])  # [BM, BN]
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [BM, BN]
    ds = p * (dp - delta[:, None])  # [BM, BN]
    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)  # [BM, BD]
    return dq
"""

_DQ = '''
@triton.jit
def {name}(
    Q, K, V, DO, LSE, Delta, DQ, MaskT, QOrder, KVOrder, HeadProgram,
    PartialNum, PartialIdx, FullNum, FullIdx, Visits,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    sm_scale,
    H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr,
    Q_LEN: tl.constexpr, KV_LEN: tl.constexpr, Q_OFFSET: tl.constexpr,
    NUM_Q_BLOCKS: tl.constexpr, NUM_KV_BLOCKS: tl.constexpr, MAX_PARTIAL: tl.constexpr, MAX_FULL: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_MASK_TENSOR: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
):
    """dQ of one query block of one (batch, head): loops over the partial then full kv blocks of
    the forward block table (PartialNum/PartialIdx, FullNum/FullIdx: [programs, NUM_Q_BLOCKS(, width)])."""
    tl.static_assert(H == H_KV * GROUP)
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hkv = off_h // GROUP
    prog = tl.load(HeadProgram + off_h).to(tl.int64)

    q_slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] kernel slots
    q_ok = q_slots < Q_LEN
    if HAS_PERM:
        q_rows = tl.load(QOrder + q_slots, mask=q_ok, other=0).to(tl.int64)  # [BM] model rows
    else:
        q_rows = q_slots.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + q_rows[:, None] * stride_qm + d[None, :],
                mask=q_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BM, BD]
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + q_rows[:, None] * stride_dom + dv_cols[None, :],
                 mask=q_ok[:, None] & (dv_cols < HEAD_DIM_V)[None, :], other=0.0)  # [BM, BDV]
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_off = off_bh * Q_LEN + q_rows
    lse = tl.load(LSE + row_off, mask=q_ok, other=float("inf"))  # [BM]
    # a row with no key has lse = -inf and zero gradient: +inf makes its P exactly 0
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row_off, mask=q_ok, other=0.0)  # [BM]
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    table_row = prog * NUM_Q_BLOCKS + pid_m
    n_partial = tl.load(PartialNum + table_row)
    for i in range(n_partial):
        kv_block = tl.load(PartialIdx + table_row * MAX_PARTIAL + i).to(tl.int64)
        dq = {step}(
            dq, q, do, lse, delta, q_rows, q_ok, kv_block, off_b, off_h, off_hkv, prog,
            K, V, MaskT, KVOrder,
            stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_mb, stride_mh, stride_mm, stride_mn,
            sm_scale, KV_LEN, Q_OFFSET, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
            True, HAS_PERM, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, UPCAST, INPUT_PRECISION,
        )
        if COUNT_VISITS:
            tl.atomic_add(Visits + (off_bh * NUM_Q_BLOCKS + pid_m) * NUM_KV_BLOCKS + kv_block, 1)
    n_full = tl.load(FullNum + table_row)
    for i in range(n_full):
        kv_block = tl.load(FullIdx + table_row * MAX_FULL + i).to(tl.int64)
        dq = {step}(
            dq, q, do, lse, delta, q_rows, q_ok, kv_block, off_b, off_h, off_hkv, prog,
            K, V, MaskT, KVOrder,
            stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_mb, stride_mh, stride_mm, stride_mn,
            sm_scale, KV_LEN, Q_OFFSET, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
            False, HAS_PERM, HAS_MASK_TENSOR, MASK_IS_BOOL, EVEN_Q, EVEN_KV, UPCAST, INPUT_PRECISION,
        )
        if COUNT_VISITS:
            tl.atomic_add(Visits + (off_bh * NUM_Q_BLOCKS + pid_m) * NUM_KV_BLOCKS + kv_block, 1)

    # scores are sm_scale * q.k, so dQ picks up the scale once here
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + q_rows[:, None] * stride_dqm + d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_ok[:, None] & (d < HEAD_DIM)[None, :])
'''


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
        *(f"# {line}" for line in plan.describe().splitlines()),
        "# generated source: dQ and dK/dV recompute P = exp(scale * q.k - lse) per visited block",
        "import triton",
        "import triton.language as tl",
        "",
        "_sum_combine = tl.standard._sum_combine",
        "",
    ]
    parts = ["\n".join(header)]
    parts.append("\n" + emit_mask_predicate(plan))
    parts.append(_PREPROCESS.replace("{name}", names["preprocess"]))
    parts.append(_DKDV_STEP.replace("{name}", f"{p}_bwd_dkdv_step"))
    parts.append(_DKDV.replace("{name}", names["dkdv"]).replace("{step}", f"{p}_bwd_dkdv_step"))
    parts.append(_DQ_STEP.replace("{name}", f"{p}_bwd_dq_step"))
    parts.append(_DQ.replace("{name}", names["dq"]).replace("{step}", f"{p}_bwd_dq_step"))
    return "\n".join(parts)
