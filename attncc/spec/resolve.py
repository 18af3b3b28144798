"""Resolution: what a spec means for one attention site, down to the plan its kernel is built from.

:func:`plan_for` is the one place a plan is made from a spec: the compiler's bind pass, the
``attncc dump`` / ``attncc explain`` commands, :func:`attncc.dense_mask` and
:func:`attncc.explain` all call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from attncc.ir import masks as M
from attncc.ir.dtypes import DTypeName
from attncc.ir.permute import TilePermutation
from attncc.ir.plan import AttentionPlan, MaskKind, QueryPositions
from attncc.ir.score_mod import ScoreMod
from attncc.ir.selection import SelectorError, resolve_selector, selector_problem, selectors_of
from attncc.spec.errors import SpecError
from attncc.spec.models import Spec


@dataclass(frozen=True)
class ResolvedPolicy:
    """What a rule means for one attention site."""

    rule_index: int
    rule: str
    programs: tuple[M.Mask, ...]
    head_to_program: tuple[int, ...]
    permute: TilePermutation | None
    block_q: int
    block_kv: int


def _has_selector(spec: Spec, index: int) -> bool:
    return any(m.is_dynamic for m, _ in spec.compiled(index).masks())


Problem = tuple[str, tuple] | None


def runtime_problem(spec: Spec, index: int) -> Problem:
    """Why rule ``index``'s ``reuse`` or ``permute.by`` cannot run as written, as (what, key path),
    or None. Checks what the spec alone decides; what depends on the bound sites (a producer
    before the consumer, equal shapes) is checked by the ``thread-selections`` pass."""
    return _reuse_problem(spec, index) or _permute_problem(spec, index)


def _reuse_problem(spec: Spec, index: int) -> Problem:
    rule = spec.rules[index]
    reuse, permute = rule.reuse, rule.permute
    if reuse is None:
        return None

    def bad(why: str, *key: str) -> tuple[str, tuple]:
        return f"'reuse' of a block selection ({why})", ("rules", index, "reuse") + key

    across_calls = reuse.dense_first is not None or reuse.refresh_every is not None
    if reuse.from_ is None and not across_calls:
        return bad(
            "give 'from' (a rule name or layer: reuse across layers) or 'dense_first' / 'refresh_every' (across calls)"
        )
    if reuse.from_ is not None and across_calls:
        return bad(
            "'from' (across layers) and 'dense_first' / 'refresh_every' (across calls) cannot be combined in one rule"
        )
    if not _has_selector(spec, index):
        return bad("the rule's mask has no topk/threshold selector for a reused selection to stand for")
    if permute is not None and permute.by is not None:
        return bad("a reused selection cannot be combined with a run-time permutation 'permute.by'")
    if not isinstance(reuse.from_, str):
        return None
    names = [spec.rule_name(j) for j in range(len(spec.rules))]
    j = spec.rule_index(reuse.from_)
    if j is None:
        close = [n for n in names if n.lower() == reuse.from_.lower()]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return bad(f"no rule is named '{reuse.from_}'{hint}; rules: {', '.join(names)}", "from")
    if j == index:
        return bad("a rule cannot reuse its own selection; name the rule that computes it", "from")
    src = spec.rules[j]
    if not _has_selector(spec, j):
        return bad(f"rule '{reuse.from_}' has no topk/threshold selector, so it computes no selection", "from")
    if src.reuse is not None and (src.reuse.dense_first is not None or src.reuse.refresh_every is not None):
        return bad(
            f"rule '{reuse.from_}' reuses its selection across calls; reuse across layers "
            "needs a rule that selects on every call",
            "from",
        )
    if src.permute is not None and src.permute.by is not None:
        return bad(
            f"rule '{reuse.from_}' selects in a run-time key order that does not carry over to another layer", "from"
        )
    return None


def _permute_problem(spec: Spec, index: int) -> Problem:
    permute = spec.rules[index].permute
    if permute is None or permute.by is None:
        return None
    by_name, segment = permute.by, permute.segment

    def bad(why: str, *key: str) -> tuple[str, tuple]:
        return f"the run-time permutation 'by: {by_name}' ({why})", ("rules", index, "permute") + key

    if segment is None:
        return bad("give 'segment': keys are sorted inside consecutive segments of that many tokens", "by")
    if not _has_selector(spec, index):
        return bad(
            "the rule's mask has no topk/threshold selector to run in the permuted order; "
            "without one the key order changes nothing",
            "by",
        )
    block_q, block_kv = spec.block_sizes(index)
    for mask, _ in spec.compiled(index).masks():
        for sel in selectors_of(mask):
            try:
                cfg = resolve_selector(sel, block_q, block_kv)
            except SelectorError:
                continue  # reported by selector_problem
            if cfg.method == "vertical_slash":
                return bad(
                    "the vertical_slash selector ranks key columns and diagonals, which a key order "
                    "sorted at run time does not keep; use topk or threshold",
                    "by",
                )
            if segment % cfg.block:
                return bad(
                    f"segment {segment} must be a multiple of the selector block {cfg.block} so every "
                    f"selected block lies inside one segment",
                    "segment",
                )
    return None


def check_executable(spec: Spec, rule_index: int) -> None:
    """Raise a SpecError naming the rule if it uses a construct spec v1 validates but this
    attncc cannot run: a data-dependent selector (``topk``/``threshold``) that
    :func:`attncc.ir.selection.selector_problem` rejects, or a run-time permutation
    (``permute.by``) or ``reuse`` that :func:`runtime_problem` rejects. Binding such a rule
    fails at compile time; it is never run dense instead."""
    rule = spec.rules[rule_index]
    name = spec.rule_name(rule_index)
    found: list[tuple[str, tuple]] = []
    block_q, block_kv = spec.block_sizes(rule_index)
    permuted = rule.permute is not None and rule.permute.grid is not None
    for mask, where in spec.compiled(rule_index).masks():
        problem = selector_problem([mask], block_q, block_kv, permuted) if mask.is_dynamic else None
        if problem is not None:
            found.append(
                (
                    f"the data-dependent selector '{selectors_of(mask)[0].name}' ({problem})",
                    ("rules", rule_index, *where),
                )
            )
    runtime = runtime_problem(spec, rule_index)
    if runtime is not None:
        found.append(runtime)
    if found:
        what, path = found[0]
        raise spec.error(
            f"rule '{name}' uses {what}, which spec v1 accepts but this attncc cannot execute yet; "
            f"remove it or restrict the rule's 'where' so no attention binds to it (attncc never "
            f"runs such a rule dense instead)",
            path,
        )


def resolve(spec: Spec, layer: int, module: str, num_heads: int, check: bool = True) -> ResolvedPolicy | None:
    """The policy of the first rule matching ``layer``/``module`` (None: no rule, the site
    stays as it is). ``check`` raises SpecError for rules that cannot execute
    (see :func:`check_executable`)."""
    i = spec.match(layer, module)
    if i is None:
        return None
    if check:
        check_executable(spec, i)
    programs, index = spec.head_policy(i, num_heads)
    bq, bkv = spec.block_sizes(i)
    return ResolvedPolicy(i, spec.rule_name(i), programs, index, spec.permutation(i), bq, bkv)


class PositionError(SpecError):
    """A rule's mask reads query positions at a site whose query positions are unknown."""


@dataclass(frozen=True)
class SiteShape:
    """What resolution needs to know about one attention: where it is, its shapes, dtype and
    scale, and the model's own mask (structure, plus the kind of run-time mask tensor it passes).
    ``kv_len``/``num_kv_heads``/``head_dim_v``/``scale`` default to ``q_len``/``num_heads``/
    ``head_dim``/``head_dim ** -0.5``."""

    num_heads: int
    q_len: int
    kv_len: int | None = None
    layer: int = 0
    module: str = ""
    num_kv_heads: int | None = None
    head_dim: int = 64
    head_dim_v: int | None = None
    dtype: DTypeName = "float32"
    scale: float | None = None
    model_mask: M.Mask = M.Full()
    mask_kind: MaskKind | None = None
    q_offset: int = 0
    #: where the queries sit among the keys (:class:`attncc.ir.plan.QueryPositions`), or
    #: ``unknown`` where the model does not say (cross-attention)
    q_positions: QueryPositions | Literal["unknown"] = "start"
    #: False when the operands merge batch and heads and the graph does not show the head count
    heads_known: bool = True
    #: the model's soft-capping / ALiBi of the scores (kept in every plan: it is the model's)
    score_mod: ScoreMod | None = None

    @property
    def where(self) -> str:
        return self.module or "<top>"


def plan_for(spec: Spec, shape: SiteShape, check: bool = True) -> AttentionPlan | None:
    """The plan ``spec`` gives an attention of ``shape``, or None when no rule matches it.

    The plan's programs are the rule's masks intersected with the model's own mask. Raises
    SpecError, naming the rule, for a rule that cannot apply here: one that cannot execute
    (``check``), a head index out of range, a head-dependent rule where the head count is not
    known, lengths a grid does not hold."""
    policy = resolve(spec, shape.layer, shape.module, shape.num_heads, check=check)
    if policy is None:
        return None
    rule_path = ("rules", policy.rule_index)
    if not shape.heads_known and (len(policy.programs) > 1 or any(p.depends_on_head for p in policy.programs)):
        raise spec.error(
            f"rule '{policy.rule}' is head-dependent but the head count of site {shape.where} "
            f"is not visible in the graph ([B*H, S, D] operands)",
            rule_path,
        )
    kv_len = shape.q_len if shape.kv_len is None else shape.kv_len
    programs = tuple(M.conj(p, shape.model_mask) for p in policy.programs)
    located = f"(rule '{policy.rule}' at {shape.where})"
    if shape.q_positions == "unknown":
        reading: M.Mask | str | None = next((p for p in programs if p.reads_query), None)
        if reading is None and shape.score_mod is not None and shape.score_mod.alibi is not None:
            reading = f"(the model's ALiBi bias, {shape.score_mod})"
        if reading is not None:
            err = spec.error(
                f"rule '{policy.rule}' at {shape.where}: its mask {reading} reads query positions, but the "
                f"positions of this site's {shape.q_len} queries among its {kv_len} keys are unknown (keys "
                "that are not a cache of the queries' own, such as cross-attention); use a mask that does not "
                "read them (full, sink) or a 'where' that leaves this attention out",
                rule_path + ("mask",),
            )
            raise PositionError(err.message, err.source, err.line, err.column, err.path)
    if policy.permute is not None:
        try:
            policy.permute.check(shape.q_len, "query")
            policy.permute.check(kv_len, "key")
        except M.MaskError as e:
            raise spec.error(f"{e.message} {located}", rule_path + ("permute",)) from None
    for p in programs:
        try:
            p.check_lengths(shape.q_len, kv_len)
        except M.MaskError as e:
            raise spec.error(f"{e.message} {located}", rule_path + ("mask",)) from None
    try:
        return AttentionPlan(
            programs=programs,
            head_to_program=policy.head_to_program,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads or shape.num_heads,
            q_len=shape.q_len,
            kv_len=kv_len,
            head_dim=shape.head_dim,
            head_dim_v=shape.head_dim_v or shape.head_dim,
            dtype=shape.dtype,
            scale=shape.scale if shape.scale is not None else shape.head_dim**-0.5,
            block_q=policy.block_q,
            block_kv=policy.block_kv,
            permute=policy.permute,
            mask_kind=shape.mask_kind,
            q_offset=shape.q_offset,
            q_positions="start" if shape.q_positions == "unknown" else shape.q_positions,
            score_mod=shape.score_mod,
            rule=policy.rule,
            name=shape.module,
        )
    except ValueError as e:
        raise spec.error(f"{e} {located}", rule_path) from None
