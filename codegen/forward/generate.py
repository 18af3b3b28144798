"""AttentionPlan -> Triton source of a FlashAttention-2 style block-sparse forward kernel.

The code depends only on the plan's mask programs and dtype (the header prints the whole
plan); every shape, stride, block size and feature switch (permutation, model mask tensor,
sequence padding) reaches the kernel as an argument or a ``tl.constexpr``, and
``kernel_constexprs`` is the one place the launcher takes that specialisation from; the
ahead-of-time compiles record a real launch (:func:`attncc.codegen.aot.recorded_jobs`).
"""

from __future__ import annotations

from attncc.codegen.common import next_pow2
from attncc.codegen.configs import TileConfig, plan_tiles
from attncc.ir.dtypes import DTYPES
from attncc.ir.plan import AttentionPlan, ranges
from attncc.version import __version__


class CodegenError(ValueError):
    """The plan asks for something the kernel generator does not emit; the message says what."""


def kernel_name(plan: AttentionPlan) -> str:
    """``<pattern>_fwd_kernel``: the name of the plan's generated forward kernel."""
    return f"{plan.pattern}_fwd_kernel"


def check_supported(plan: AttentionPlan) -> None:
    """Raise ``CodegenError`` for plans the generator cannot emit a kernel for."""
    for i, prog in enumerate(plan.programs):
        if prog.is_dynamic:
            raise CodegenError(
                f"mask program {i} ({prog}) selects blocks from the data at run time; "
                "the forward generator emits static masks only (use executor='reference')"
            )
    if DTYPES[plan.dtype].triton is None:
        triton_dtypes = [d.name for d in DTYPES.values() if d.triton]
        raise CodegenError(f"plan dtype {plan.dtype} has no Triton kernel; expected one of {', '.join(triton_dtypes)}")
    for what, d in (("head_dim", plan.head_dim), ("head_dim_v", plan.head_dim_v)):
        if not 1 <= d <= 256:
            raise CodegenError(f"{what} {d} is outside the supported range 1-256")
    for what, b in (("block_q", plan.block_q), ("block_kv", plan.block_kv)):
        if b < 16 or b & (b - 1):
            raise CodegenError(f"{what} {b} must be a power of two >= 16 (tl.dot tiles)")
    if plan.runtime_key_order and plan.permute is not None:
        raise CodegenError("a run-time key order cannot be combined with a static permutation")


def kernel_constexprs(
    plan: AttentionPlan,
    tiles: TileConfig | None = None,
    *,
    q_mult: int = 1,
    kv_mult: int = 1,
    row_order: bool = False,
    count_visits: bool = False,
    dot_fp32: bool = False,
) -> dict:
    """The ``tl.constexpr`` arguments of the plan's forward kernel on ``tiles`` (default: the plan's
    blocks); ``q_mult`` / ``kv_mult``: kernel tiles per block of the block table, per side;
    ``row_order``: programs take their table row from ``RowOrder`` (longest rows first)."""
    tiles = tiles or plan_tiles(plan)
    return {
        "H": plan.num_heads,
        "GROUP": plan.gqa_group,
        "HEAD_DIM": plan.head_dim,
        "HEAD_DIM_V": plan.head_dim_v,
        "BLOCK_D": max(16, next_pow2(plan.head_dim)),
        "BLOCK_DV": max(16, next_pow2(plan.head_dim_v)),
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "Q_MULT": q_mult,
        "KV_MULT": kv_mult,
        "HAS_PERM": plan.permute is not None,
        "HAS_MASK_TENSOR": plan.mask_kind is not None,
        "MASK_ADDITIVE": plan.mask_kind == "additive",
        "EVEN_Q": plan.q_len % tiles.block_m == 0,
        # sub-tiles of the last kv block of a table given at coarser blocks can lie past KV_LEN
        # even where it is a multiple of the tile: "even" means a multiple of the table's block
        "EVEN_KV": plan.kv_len % (tiles.block_n * kv_mult) == 0,
        "EVEN_D": plan.head_dim == max(16, next_pow2(plan.head_dim)),
        "EVEN_DV": plan.head_dim_v == max(16, next_pow2(plan.head_dim_v)),
        "HAS_ROW_ORDER": row_order,
        "COUNT_VISITS": count_visits,
        "DOT_FP32": dot_fp32,
    }


def emit_mask_predicate(plan: AttentionPlan) -> str:
    """Source of the ``@triton.jit`` helper ``_mask(q_pos, kv_pos, off_h, KV_LEN, PROGRAM)``
    (plus the helpers its predicates call, such as ``random_blocks``' hash): True where query position
    ``q_pos [BM, 1]`` may attend key position ``kv_pos [1, BN]`` (model order, int64) under
    mask program ``PROGRAM`` (a run-time int32 scalar; ignored when the plan has one program).
    Backward kernels reuse it unchanged."""
    check_supported(plan)
    # helpers the predicates call (random_blocks' hash), each emitted once
    helpers = dict.fromkeys(h for p in plan.programs for m in p.walk() for h in m.triton_helpers())
    out = [h.strip("\n") + "\n\n\n" for h in helpers]
    doc = [f"program {i} (heads {ranges(plan.heads_of(i))}): {p}" for i, p in enumerate(plan.programs)]
    lines = [
        "@triton.jit",
        "def _mask(q_pos, kv_pos, off_h, KV_LEN, PROGRAM):",
        '    """True where q_pos [BM, 1] may attend kv_pos [1, BN] (model positions).',
        "",
    ]
    lines += [f"    {d}" for d in doc]
    lines.append('    """')
    if len(plan.programs) == 1:
        lines.append(f"    return {plan.programs[0].triton()}")
    else:
        for i, p in enumerate(plan.programs):
            lines.append(f"    allowed_{i} = {p.triton()}")
        last = len(plan.programs) - 1
        expr = f"allowed_{last}"
        for i in reversed(range(last)):
            expr = f"tl.where(PROGRAM == {i}, allowed_{i}, {expr})"
        lines.append(f"    return {expr}")
    out.append("\n".join(lines) + "\n")
    return "".join(out)


#: imports, constants and reduction combiners every generated kernel module starts with
PREAMBLE = """import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Row reductions go through tl.reduce with Triton's standard combine functions: the same code
# tl.max / tl.sum compile to, and the Triton interpreter runs them (fast) even when it was
# switched on after triton was imported.
_max_combine = tl.standard._elementwise_max
_sum_combine = tl.standard._sum_combine


"""

_HEADER = '''\
"""{name}: block-sparse attention forward generated by attncc {version}.

{plan}

Layout: q [B, H, Sq, D], k/v [B, Hkv, Skv, D/Dv], out [B, H, Sq, Dv], lse [B, H, Sq] fp32, all
in the model's token order. Grid: (query blocks, B * H). Each program walks its block-table
row: full kv blocks first (mask predicate skipped), then partial ones (predicate evaluated).
Empty blocks are never loaded. Rows with no allowed key store zeros and lse = -inf.
"""

{preamble}'''

_LOAD_2D = '''\
@triton.jit
def _load_2d(ptrs, valid_0, valid_1, EVEN_0: tl.constexpr, EVEN_1: tl.constexpr):
    """Load a [N0, N1] tile, masking only the dimensions that are not block multiples."""
    if EVEN_0 and EVEN_1:
        x = tl.load(ptrs)
    elif EVEN_0:
        x = tl.load(ptrs, mask=valid_1[None, :], other=0.0)
    elif EVEN_1:
        x = tl.load(ptrs, mask=valid_0[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=valid_0[:, None] & valid_1[None, :], other=0.0)
    return x


'''

_VISIT = '''\
@triton.jit
def _visit_kv_block(
    acc, l_i, m_i, q, q_idx, q_pos, q_valid, kv_block, off_b, off_h, off_hkv, program,
    K, V, MaskTensor, Order,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    qk_scale, KV_LEN,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_PARTIAL: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_MASK_TENSOR: tl.constexpr, MASK_ADDITIVE: tl.constexpr,
    EVEN_KV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One online-softmax step over kv block ``kv_block`` (kernel order); scores in log2 units."""
    offs_n = kv_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] kernel slots
    kv_valid = offs_n < KV_LEN  # [BN]
    if HAS_PERM:
        # gather: kernel slot -> model position
        kv_idx = tl.load(Order + offs_n, mask=kv_valid, other=0)  # [BN] int64
    else:
        kv_idx = offs_n
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + kv_idx[None, :] * stride_ks + offs_d[:, None] * stride_kd
    k_t = _load_2d(k_ptrs, offs_d < HEAD_DIM, kv_valid, EVEN_D, EVEN_KV)  # [BD, BN]
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + kv_idx[:, None] * stride_vs + offs_dv[None, :] * stride_vd
    v = _load_2d(v_ptrs, kv_valid, offs_dv < HEAD_DIM_V, EVEN_KV, EVEN_DV)  # [BN, BDV]
    if DOT_FP32:
        # the interpreter's low-precision tl.dot is inexact: upcast the operands
        k_t = k_t.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k_t{dot_kwargs}) * qk_scale  # [BM, BN]
{score_mod}{mask_tensor}    if IS_PARTIAL:
        allowed = _mask(q_pos, kv_idx[None, :], off_h, KV_LEN, program)  # [BM, BN]
        if not EVEN_KV:
            allowed = allowed & kv_valid[None, :]
        s = tl.where(allowed, s, float("-inf"))
    elif not EVEN_KV:
        s = tl.where(kv_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))  # [BM]
    # a row with nothing allowed yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BM]
    p = tl.math.exp2(s - m_shift[:, None])  # [BM, BN]
    alpha = tl.math.exp2(m_i - m_shift)  # [BM]
    l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v{dot_kwargs})  # [BM, BDV]
    return acc, l_i, m_new


'''

#: run-time integers the JIT must not specialise on (divisible by 16, equal to 1): a call at a new
#: length or offset reuses the compiled kernel (only EVEN_Q / EVEN_KV are constexprs of the lengths)
RUNTIME_INTS = ("Q_LEN", "KV_LEN", "Q_OFFSET", "NUM_Q_BLOCKS", "MAX_PARTIAL", "MAX_FULL")

_KERNEL = """\
@triton.jit(do_not_specialize={runtime_ints})
def {name}(
    Q, K, V, Out, Lse, MaskTensor, Order,{kv_order_arg}{head_to_program}
    KvNumBlocks, KvIndices, FullNumBlocks, FullIndices, RowOrder, Visits,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    qk_scale, Q_LEN, KV_LEN, Q_OFFSET, NUM_Q_BLOCKS, MAX_PARTIAL, MAX_FULL,
    H: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_MULT: tl.constexpr, KV_MULT: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_MASK_TENSOR: tl.constexpr, MASK_ADDITIVE: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_ROW_ORDER: tl.constexpr, COUNT_VISITS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= HEAD_DIM_V)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(H % GROUP == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    # GQA: query heads h*GROUP .. h*GROUP+GROUP-1 share kv head h
    off_hkv = off_h // GROUP
{kv_order}{program}
    if HAS_ROW_ORDER:
        # the program's table rows longest first, so uneven rows (causal, windows near the start)
        # do not leave the last programs to run alone
        pid_m = tl.load(RowOrder + program * NUM_Q_BLOCKS + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] kernel slots
    q_valid = offs_m < Q_LEN  # [BM]
    if HAS_PERM:
        # gather: kernel slot -> model row
        q_idx = tl.load(Order + offs_m, mask=q_valid, other=0)  # [BM] int64
    else:
        q_idx = offs_m.to(tl.int64)
    q_pos = (q_idx + Q_OFFSET)[:, None]  # [BM, 1] model positions
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + q_idx[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = _load_2d(q_ptrs, q_valid, offs_d < HEAD_DIM, EVEN_Q, EVEN_D)  # [BM, BD]
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BM] running max, log2 units
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # [BM] running sum of exp2
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)  # [BM, BDV]
    num_visited = 0
    # Q_MULT kernel tiles share a block-table row (a table given at coarser blocks than the tile)
    table_row = program * NUM_Q_BLOCKS + pid_m // Q_MULT

{full_loop}{partial_loop}    if COUNT_VISITS:
        tl.store(Visits + pid_bh * tl.num_programs(0) + pid_m, num_visited)
    # rows with no allowed key: l = 0 -> output 0, lse = -inf
    empty_row = l_i == 0.0  # [BM]
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]  # [BM, BDV]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)  # [BM] natural log
    # scatter: rows go back to model order
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + q_idx[:, None] * stride_os + offs_dv[None, :] * stride_od
    if EVEN_Q and EVEN_DV:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + pid_bh.to(tl.int64) * Q_LEN + q_idx, lse, mask=q_valid)
"""

#: one walk over a block-table row: full kv blocks (predicate skipped), or partial ones
_LOOP = """\
    # {what}
    num_{kind} = tl.load({counts} + table_row)
    {kind}_row = {indices} + table_row * {width}
    # the next block index is loaded one step ahead, so the k/v loads of a step do not wait on it
    next_block = tl.load({kind}_row, mask=num_{kind} > 0, other=0)
    for i in range(0, num_{kind}):
        table_block = next_block
        next_block = tl.load({kind}_row + i + 1, mask=i + 1 < num_{kind}, other=0)
        # the KV_MULT kernel tiles of the table's kv block (one when the table is at the tile)
        for j in tl.static_range(KV_MULT):
            acc, l_i, m_i = _visit_kv_block(
                acc, l_i, m_i, q, q_idx, q_pos, q_valid, table_block * KV_MULT + j, off_b, off_h, off_hkv, program,
                K, V, MaskTensor, {kv_gather},
                stride_kb, stride_kh, stride_ks, stride_kd,
                stride_vb, stride_vh, stride_vs, stride_vd,
                stride_mb, stride_mh, stride_mq, stride_mk,
                qk_scale, KV_LEN,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, {is_partial}, {kv_perm},
                HAS_MASK_TENSOR, MASK_ADDITIVE, EVEN_KV, EVEN_D, EVEN_DV, DOT_FP32,
            )
            if COUNT_VISITS:
                num_visited += 1

"""
#: the two walks: (placeholder, comment, loop variable, counts, indices, row width, IS_PARTIAL)
_LOOPS = [
    ("full_loop", "full kv blocks: every pair is allowed, the mask predicate is skipped", "full")
    + ("FullNumBlocks", "FullIndices", "MAX_FULL", "False"),
    ("partial_loop", "partial kv blocks: the mask predicate decides pair by pair", "partial")
    + ("KvNumBlocks", "KvIndices", "MAX_PARTIAL", "True"),
]

_KV_ORDER = (
    "    # run-time key order of this (batch, kv head), [Skv] int64: kernel slot -> model key position.\n"
    "    # k/v blocks are gathered through it (the model mask and the predicate see model positions);\n"
    "    # queries stay in model order, so nothing is scattered back\n"
    "    kv_order = KvOrder + (off_b * (H // GROUP) + off_hkv) * KV_LEN\n"
)
_ONE_PROGRAM = "    program = 0\n"
_MANY_PROGRAMS = (
    "    # head policy: this head's mask program selects its predicate and block-table rows\n"
    "    program = tl.load(HeadToProgram + off_h)\n"
)


#: the score modification's call in ``_visit_kv_block`` (scores there are in log2 units)
_SCORE_MOD_CALL = (
    "    # the model's score modification, before its mask and the spec's (positions in model order)\n"
    "    s = _score_mod(s, q_pos, kv_idx[None, :], off_h, LOG2E)  # [BM, BN]\n"
)


#: the model's mask tensor in ``_visit_kv_block`` (its ``{mask_tensor}``) ...
_MASK_TENSOR_STEP = """\
    if HAS_MASK_TENSOR:
        m_ptrs = MaskTensor + off_b * stride_mb + off_h * stride_mh + q_idx[:, None] * stride_mq \\
            + kv_idx[None, :] * stride_mk
        model_mask = tl.load(m_ptrs, mask=q_valid[:, None] & kv_valid[None, :], other=0)  # [BM, BN]
        if MASK_ADDITIVE:
            s += model_mask.to(tl.float32) * LOG2E
        else:
            s = tl.where(model_mask != 0, s, float("-inf"))
"""
#: ... and for packed documents: MaskTensor holds the document id of every key position
#: (stride_mb per batch, stride_mq = stride_mk per position); queries read it at their positions
_DOCUMENTS_STEP = """\
    if HAS_MASK_TENSOR:
        # packed documents: a query sees only the keys of its own document
        doc_q = tl.load(MaskTensor + off_b * stride_mb + q_pos * stride_mq, mask=q_valid[:, None], other=-1)  # [BM, 1]
        doc_k = tl.load(MaskTensor + off_b * stride_mb + kv_idx[None, :] * stride_mk, mask=kv_valid[None, :], other=-2)
        s = tl.where(doc_q == doc_k, s, float("-inf"))  # [BM, BN]
"""


def kernel_helpers(plan: AttentionPlan) -> str:
    """The mask predicate, the score modification, the tile loader and the online-softmax step
    ``_visit_kv_block``: the forward kernel's helpers, which the decode kernel calls unchanged
    (with a head and a program per row)."""
    # fp32 plans keep fp32 accuracy on GPUs too (no TF32)
    dot_kwargs = ', input_precision="ieee"' if plan.dtype == "float32" else ""
    mod = plan.score_mod
    score_mod = "" if mod is None else mod.triton_source() + "\n\n"
    visit = _VISIT.format(
        dot_kwargs=dot_kwargs,
        score_mod="" if mod is None else _SCORE_MOD_CALL,
        mask_tensor=_DOCUMENTS_STEP if plan.mask_kind == "documents" else _MASK_TENSOR_STEP,
    )
    return emit_mask_predicate(plan) + "\n\n" + score_mod + _LOAD_2D + visit


def generate_forward(plan: AttentionPlan) -> str:
    """Complete module source for the plan's forward kernel ``kernel_name(plan)``."""
    check_supported(plan)
    name = kernel_name(plan)
    many = len(plan.programs) > 1
    header = _HEADER.format(name=name, version=__version__, plan=plan.describe_kernel(), preamble=PREAMBLE)
    kv = plan.runtime_key_order
    # a run-time key order gathers k/v through its row (static permutations are excluded)
    gather = {"kv_gather": "kv_order" if kv else "Order", "kv_perm": "True" if kv else "HAS_PERM"}
    fields = ("what", "kind", "counts", "indices", "width", "is_partial")
    loops = {key: _LOOP.format(**dict(zip(fields, row)), **gather) for key, *row in _LOOPS}
    kernel = _KERNEL.format(
        name=name,
        runtime_ints=repr(list(RUNTIME_INTS)),
        kv_order_arg=" KvOrder," if kv else "",
        head_to_program=" HeadToProgram," if many else "",
        kv_order=_KV_ORDER if kv else "",
        program=_MANY_PROGRAMS if many else _ONE_PROGRAM,
        **loops,
    )
    return header + kernel_helpers(plan) + kernel
