"""Selector programs: how a mask with a data-dependent block selector splits into two static
masks, the selector's resolved parameters, and which selector rules this attncc can run.

A selector node ``{topk: ...}`` / ``{threshold: ...}`` / ``{vertical_slash: ...}`` is a predicate
that is constant on each (selector query block, selector kv block) pair: True on the selected
pairs. A mask program ``F`` with one selector ``s`` therefore equals ``F[s := full]`` on selected block pairs and
``F[s := empty]`` elsewhere; both are static masks with ordinary block tables and predicates.
The selector chooses among its *candidates*: the block pairs where the two differ (where the
selection changes the mask). Blocks a static part already keeps are not candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

from attncc.ir import masks as M
from attncc.ir.masks import EMPTY
from attncc.ir.masks.vertical_slash import DEFAULTS as VERTICAL_SLASH_DEFAULTS
from attncc.ir.scores import GROUP_PARAMS, SCORES, Score


class SelectorError(ValueError):
    """A selector cannot run as written; the message says why and what would be accepted."""


def _is_empty(m: M.Mask) -> bool:
    return m == EMPTY


def substitute(mask: M.Mask, target: M.Mask, value: bool) -> M.Mask:
    """``mask`` with every occurrence of ``target`` replaced by full (True) or empty (False),
    simplified so the result's predicate carries no dead terms."""
    if mask == target:
        return M.Full() if value else EMPTY
    if isinstance(mask, M.Not):
        inner = substitute(mask.item, target, value)
        if isinstance(inner, M.Full):
            return EMPTY
        if _is_empty(inner):
            return M.Full()
        return M.Not(inner)
    if isinstance(mask, (M.All, M.Any_)):
        conj = isinstance(mask, M.All)
        items: list[M.Mask] = []
        for child in mask.items:
            c = substitute(child, target, value)
            absorbing = _is_empty(c) if conj else isinstance(c, M.Full)
            neutral = isinstance(c, M.Full) if conj else _is_empty(c)
            if absorbing:
                return c
            if not neutral and c not in items:
                items.append(c)
        if not items:
            return M.Full() if conj else EMPTY
        if len(items) == 1:
            return items[0]
        return M.All(tuple(items)) if conj else M.Any_(tuple(items))
    return mask


def selectors_of(mask: M.Mask) -> list[M.Selector]:
    """Distinct selector nodes of ``mask`` in walk order."""
    out: list[M.Selector] = []
    for node in mask.walk():
        if isinstance(node, M.Selector) and node not in out:
            out.append(node)
    return out


@dataclass(frozen=True)
class SelectorConfig:
    """A selector with its parameters resolved against the kernel's block sizes.

    ``block`` is the selection granularity in tokens (queries and keys alike); it is a multiple
    of both kernel block sizes so the selector is constant on every kernel block pair.
    ``pool`` is the token group behind one score feature: ``block`` for ``mean_pool``,
    ``pool`` for ``draft``, ``stride`` for ``antidiagonal``. A ``vertical_slash`` selector has
    no block score (``score`` is empty, ``pool`` the block): it ranks key columns and
    diagonals from the attention of the ``last_q`` last queries (``vertical``, ``slash``,
    ``keep_first``, ``keep_recent``: see :mod:`attncc.ir.masks.vertical_slash`).
    """

    method: str  # "topk" | "threshold" | "vertical_slash"
    score: str  # a name in attncc.ir.scores.SCORES ("" for vertical_slash)
    block: int
    pool: int
    k: int = 0
    tau: float = 1.0
    min_blocks: int = 0
    vertical: int = 0
    slash: int = 0
    last_q: int = 0
    keep_first: int = 0
    keep_recent: int = 0

    @property
    def score_kind(self) -> Score:
        return SCORES[self.score]

    @property
    def rows_per_block(self) -> int:
        return self.block // self.pool

    @property
    def keep(self) -> int:
        """Blocks always kept per row (by rank): ``k`` for top-k, ``min_blocks`` for threshold."""
        return max(self.k, self.min_blocks) if self.method == "topk" else self.min_blocks


def resolve_selector(sel: M.Selector, block_q: int, block_kv: int) -> SelectorConfig:
    """Resolve defaults and check ``sel`` against the kernel block sizes (SelectorError)."""
    block = sel.param("block", max(block_q, block_kv))
    if block % block_q or block % block_kv:
        raise SelectorError(
            f"{sel}: block {block} must be a multiple of the kernel block sizes ({block_q} x {block_kv}) "
            f"so the selection is constant on every kernel block; use block: {max(block_q, block_kv)} or a multiple"
        )
    if sel.method == "vertical_slash":
        return SelectorConfig(
            method=sel.method,
            score="",
            block=block,
            pool=block,
            vertical=int(sel.param("vertical")),
            slash=int(sel.param("slash")),
            **{key: int(sel.param(key, default)) for key, default in VERTICAL_SLASH_DEFAULTS.items()},
        )
    score = SCORES[sel.param("score", "mean_pool")]
    for p in GROUP_PARAMS:
        if sel.param(p) is not None and p != score.group_param:
            owner = next(s.name for s in SCORES.values() if s.group_param == p)
            raise SelectorError(f"{sel}: '{p}' applies to score: {owner} only (score is {score.name})")
    group = score.group(sel.param(score.group_param) if score.group_param else None, block)
    if block % group:
        raise SelectorError(f"{sel}: {score.group_param} {group} must divide the selector block {block}")
    return SelectorConfig(
        method=sel.method,
        score=score.name,
        block=block,
        pool=group,
        k=int(sel.param("k", 0) or 0),
        tau=float(sel.param("tau", 1.0)),
        min_blocks=int(sel.param("min_blocks", 0) or 0),
    )


@dataclass(frozen=True)
class SelectorProgram:
    """A mask program split at its selector: ``when_selected`` holds on selected block pairs,
    ``when_not`` elsewhere (both static; ``selector`` is None for a static program, where
    the two are the program itself)."""

    program: M.Mask
    selector: M.Selector | None
    when_selected: M.Mask
    when_not: M.Mask


def split_program(mask: M.Mask) -> SelectorProgram:
    """Split ``mask`` at its one selector (SelectorError for more than one distinct selector)."""
    sels = selectors_of(mask)
    if not sels:
        return SelectorProgram(mask, None, mask, mask)
    if len(sels) > 1:
        raise SelectorError(
            f"mask {mask} combines {len(sels)} different selectors ({', '.join(str(s) for s in sels)}); "
            "one selector per mask program is supported"
        )
    sel = sels[0]
    return SelectorProgram(mask, sel, substitute(mask, sel, True), substitute(mask, sel, False))


def selector_problem(masks: list[M.Mask], block_q: int, block_kv: int, permuted: bool) -> str | None:
    """Why a rule whose mask programs are ``masks`` cannot run its selectors, or None."""
    for mask in masks:
        try:
            split = split_program(mask)
            if split.selector is None:
                continue
            resolve_selector(split.selector, block_q, block_kv)
        except SelectorError as e:
            return str(e)
        if permuted:
            return (
                f"the selector {split.selector} cannot be combined with a static permutation "
                "(selection runs in model order)"
            )
    return None


def call_phase(call: int, dense_first: int, refresh_every: int) -> str:
    """What call ``call`` (0-based since the last reset) of a site with call reuse does:
    ``"dense"`` (the model's own mask only) for the first ``dense_first`` calls, then
    ``"select"`` (compute the selection) every ``refresh_every`` calls (0: only the first
    time), ``"reuse"`` (the stored selection) otherwise. A stored selection that does not fit
    the inputs is recomputed by the caller whatever this says."""
    if call < dense_first:
        return "dense"
    due = (call - dense_first) % refresh_every == 0 if refresh_every else call == dense_first
    return "select" if due else "reuse"
