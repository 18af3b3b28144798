"""Triton kernels of block selection: score features, block logits, top-k / threshold
selection and the run-time block tables, all on the device without a host synchronisation.

:mod:`attncc.codegen.selectors` imports this module once per target (``interpret`` or
``cuda``), like the generated attention kernels, and holds the pure-torch reference of every
kernel here.
"""

import triton
import triton.language as tl

_max_combine = tl.standard._elementwise_max
_sum_combine = tl.standard._sum_combine


@triton.jit
def score_features_kernel(
    X,
    Feat,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_xd,
    HX,
    SEQ,
    NUM_ROWS,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MEAN: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """One feature row per ``GROUP`` tokens: their mean (``MEAN``, out ``[.., NUM_ROWS, D]``) or the
    tokens laid end to end, in reverse order within the group when ``REVERSE`` (out
    ``[.., NUM_ROWS, GROUP * D]``): a dot product of a reversed query group with a key group is
    the sum along the antidiagonal of their score tile."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HX).to(tl.int64)
    off_h = (pid_bh % HX).to(tl.int64)
    offs_t = tl.arange(0, GROUP_PAD)  # [G]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    if REVERSE:
        src_t = GROUP - 1 - offs_t
    else:
        src_t = offs_t
    tok = pid_r.to(tl.int64) * GROUP + src_t  # [G] token index
    valid = (offs_t < GROUP) & (tok < SEQ)  # [G]
    ptrs = X + off_b * stride_xb + off_h * stride_xh + tok[:, None] * stride_xs + offs_d[None, :] * stride_xd
    x = tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)  # [G, BD]
    row = pid_bh.to(tl.int64) * NUM_ROWS + pid_r
    if MEAN:
        count = tl.reduce(valid.to(tl.float32), 0, _sum_combine)
        mean = tl.reduce(x, 0, _sum_combine) / count  # [BD]
        tl.store(Feat + row * HEAD_DIM + offs_d, mean, mask=offs_d < HEAD_DIM)
    else:
        out = Feat + row * (GROUP * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(out, x, mask=(offs_t[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def block_logits_kernel(
    QFeat,
    KFeat,
    KvHead,
    Cand,
    Logits,
    H,
    HKV,
    NUM_Q_ROWS,
    NUM_K_ROWS,
    NUM_Q_BLOCKS,
    NUM_K_BLOCKS,
    scale,
    ROWS: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    FEAT: tl.constexpr,
    FEAT_PAD: tl.constexpr,
):
    """``Logits[b, h, i, j] = logsumexp`` of the feature scores ``scale * qf . kf`` over the feature
    rows of query block ``i`` and kv block ``j``; ``-inf`` where ``Cand[i, j]`` is 0."""
    tl.static_assert(ROWS_PAD >= 16)
    tl.static_assert(FEAT_PAD >= 16)
    pid_i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    off_hkv = tl.load(KvHead + off_h).to(tl.int64)
    offs_r = tl.arange(0, ROWS_PAD)  # [R]
    offs_f = tl.arange(0, FEAT_PAD)  # [F]
    q_rows = pid_i.to(tl.int64) * ROWS + offs_r
    q_valid = (offs_r < ROWS) & (q_rows < NUM_Q_ROWS)  # [R]
    q_ptrs = QFeat + (pid_bh.to(tl.int64) * NUM_Q_ROWS + q_rows[:, None]) * FEAT + offs_f[None, :]
    qf = tl.load(q_ptrs, mask=q_valid[:, None] & (offs_f[None, :] < FEAT), other=0.0)  # [R, F]
    out_row = Logits + (pid_bh.to(tl.int64) * NUM_Q_BLOCKS + pid_i) * NUM_K_BLOCKS
    for j in range(0, NUM_K_BLOCKS):
        cand = tl.load(Cand + pid_i.to(tl.int64) * NUM_K_BLOCKS + j)
        if cand != 0:
            k_rows = j * ROWS + offs_r
            k_valid = (offs_r < ROWS) & (k_rows < NUM_K_ROWS)  # [R]
            k_ptrs = KFeat + ((off_b * HKV + off_hkv) * NUM_K_ROWS + k_rows[None, :]) * FEAT + offs_f[:, None]
            kf_t = tl.load(k_ptrs, mask=k_valid[None, :] & (offs_f[:, None] < FEAT), other=0.0)  # [F, R]
            s = tl.dot(qf, kf_t, input_precision="ieee") * scale  # [R, R]
            s = tl.where(q_valid[:, None] & k_valid[None, :], s, float("-inf"))
            m = tl.reduce(tl.reduce(s, 1, _max_combine), 0, _max_combine)
            total = tl.reduce(tl.reduce(tl.exp(s - m), 1, _sum_combine), 0, _sum_combine)
            tl.store(out_row + j, m + tl.log(total))
        else:
            tl.store(out_row + j, float("-inf"))


@triton.jit
def select_blocks_kernel(
    Logits,
    Cand,
    Selected,
    NUM_Q_BLOCKS,
    NUM_K_BLOCKS,
    tau,
    KEEP: tl.constexpr,
    TOPK: tl.constexpr,
    NK_PAD: tl.constexpr,
):
    """Per (b, h, query block): a candidate kv block is selected when its rank (higher logit
    first, lower block index first among equal logits) is below ``KEEP``, or, for a threshold
    (``not TOPK``), when the softmax mass of the candidates ranked before it is below ``tau``
    (the smallest prefix reaching ``tau``)."""
    pid_i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs = tl.arange(0, NK_PAD)  # [NK]
    in_row = offs < NUM_K_BLOCKS
    row = (pid_bh.to(tl.int64) * NUM_Q_BLOCKS + pid_i) * NUM_K_BLOCKS
    cand = tl.load(Cand + pid_i.to(tl.int64) * NUM_K_BLOCKS + offs, mask=in_row, other=0) != 0  # [NK]
    logit = tl.load(Logits + row + offs, mask=in_row, other=float("-inf"))  # [NK]
    logit = tl.where(cand, logit, float("-inf"))
    m = tl.reduce(logit, 0, _max_combine)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.where(cand, tl.exp(logit - m), 0.0)  # [NK]
    p = p / tl.maximum(tl.reduce(p, 0, _sum_combine), 1e-30)
    # before[a, b]: candidate a ranks ahead of block b
    li = logit[:, None]
    lj = logit[None, :]
    before = cand[:, None] & ((li > lj) | ((li == lj) & (offs[:, None] < offs[None, :])))  # [NK, NK]
    rank = tl.reduce(before.to(tl.int32), 0, _sum_combine)  # [NK]
    selected = cand & (rank < KEEP)
    if not TOPK:
        mass_before = tl.reduce(tl.where(before, p[:, None], 0.0), 0, _sum_combine)  # [NK]
        selected = selected | (cand & (mass_before < tau))
    tl.store(Selected + row + offs, selected.to(tl.int8), mask=in_row)


@triton.jit
def _compact(flag, offs, Count, Indices, row, NUM_K_BLOCKS):
    """Store the positions of ``flag`` in ascending order at ``Indices[row, :]`` and their number."""
    flag_i = flag.to(tl.int32)
    slot = tl.associative_scan(flag_i, 0, _sum_combine) - 1  # [NK] inclusive prefix count
    tl.store(Indices + row * NUM_K_BLOCKS + slot, offs.to(tl.int32), mask=flag)
    tl.store(Count + row, tl.reduce(flag_i, 0, _sum_combine))


@triton.jit
def block_tables_kernel(
    Selected,
    LabelsSel,
    LabelsNot,
    HeadToProgram,
    SelNum,
    SelIdx,
    SelFullNum,
    SelFullIdx,
    NotNum,
    NotIdx,
    NotFullNum,
    NotFullIdx,
    H,
    NUM_Q_BLOCKS,
    NUM_K_BLOCKS,
    NK_PAD: tl.constexpr,
):
    """Two block tables per (b, h, query block): selected kv blocks labelled by the program's
    mask with the selector full, and the other kv blocks labelled with the selector empty
    (label 1 = partial, 2 = full; index arrays are zero-filled by the caller)."""
    pid_i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_h = pid_bh % H
    program = tl.load(HeadToProgram + off_h).to(tl.int64)
    offs = tl.arange(0, NK_PAD)
    in_row = offs < NUM_K_BLOCKS
    row = pid_bh.to(tl.int64) * NUM_Q_BLOCKS + pid_i
    sel = tl.load(Selected + row * NUM_K_BLOCKS + offs, mask=in_row, other=0) != 0
    lab_row = (program * NUM_Q_BLOCKS + pid_i) * NUM_K_BLOCKS
    lab_sel = tl.load(LabelsSel + lab_row + offs, mask=in_row, other=0)
    lab_not = tl.load(LabelsNot + lab_row + offs, mask=in_row, other=0)
    _compact(in_row & sel & (lab_sel == 1), offs, SelNum, SelIdx, row, NUM_K_BLOCKS)
    _compact(in_row & sel & (lab_sel == 2), offs, SelFullNum, SelFullIdx, row, NUM_K_BLOCKS)
    _compact(in_row & (~sel) & (lab_not == 1), offs, NotNum, NotIdx, row, NUM_K_BLOCKS)
    _compact(in_row & (~sel) & (lab_not == 2), offs, NotFullNum, NotFullIdx, row, NUM_K_BLOCKS)
