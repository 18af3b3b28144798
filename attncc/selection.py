"""Selector programs: how a mask with a data-dependent block selector splits into two static
masks, the selector's resolved parameters, and which selector rules this attncc can run.

A selector node ``{topk: ...}`` / ``{threshold: ...}`` is a predicate that is constant on each
(selector query block, selector kv block) pair: True on the selected pairs. A mask program ``F``
with one selector ``s`` therefore equals ``F[s := full]`` on selected block pairs and
``F[s := empty]`` elsewhere; both are static masks with ordinary block tables and predicates.
The selector chooses among its *candidates*: the block pairs where the two differ (where the
selection changes the mask). Blocks a static part already keeps are not candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

from attncc import masks as M

#: the empty mask (no pair allowed), as a node the algebra already has
EMPTY: M.Mask = M.Not(M.Full())
#: default selector parameters
DEFAULT_STRIDE = 8
DEFAULT_POOL = 16


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
    ``pool`` for ``draft``, ``stride`` for ``antidiagonal``.
    """

    method: str  # "topk" | "threshold"
    score: str  # "mean_pool" | "antidiagonal" | "draft"
    block: int
    pool: int
    k: int = 0
    tau: float = 1.0
    min_blocks: int = 0

    @property
    def rows_per_block(self) -> int:
        return self.block // self.pool

    @property
    def keep(self) -> int:
        """Blocks always kept per row (by rank): ``k`` for top-k, ``min_blocks`` for threshold."""
        return max(self.k, self.min_blocks) if self.method == "topk" else self.min_blocks


def resolve_selector(sel: M.Selector, block_q: int, block_kv: int) -> SelectorConfig:
    """Resolve defaults and check ``sel`` against the kernel block sizes (SelectorError)."""
    score = sel.param("score", "mean_pool")
    block = sel.param("block", max(block_q, block_kv))
    if block % block_q or block % block_kv:
        raise SelectorError(
            f"{sel}: block {block} must be a multiple of the kernel block sizes ({block_q} x {block_kv}) "
            f"so the selection is constant on every kernel block; use block: {max(block_q, block_kv)} or a multiple"
        )
    stride, pool = sel.param("stride"), sel.param("pool")
    if stride is not None and score != "antidiagonal":
        raise SelectorError(f"{sel}: 'stride' applies to score: antidiagonal only (score is {score})")
    if pool is not None and score != "draft":
        raise SelectorError(f"{sel}: 'pool' applies to score: draft only (score is {score})")
    if score == "mean_pool":
        group = block
    elif score == "antidiagonal":
        group = stride if stride is not None else min(DEFAULT_STRIDE, block)
    else:
        group = pool if pool is not None else min(DEFAULT_POOL, block)
    if block % group:
        what = "stride" if score == "antidiagonal" else "pool"
        raise SelectorError(f"{sel}: {what} {group} must divide the selector block {block}")
    return SelectorConfig(
        method=sel.method,
        score=score,
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


def _rule_masks(spec, index: int) -> list[M.Mask]:
    base, overrides = spec._rule_masks[index]
    return [base] + [m for _, _, m in overrides]


def _has_selector(spec, index: int) -> bool:
    return any(m.is_dynamic for m in _rule_masks(spec, index))


def _rule_index(spec, name: str) -> int | None:
    for j in range(len(spec.rules)):
        if spec.rule_name(j) == name:
            return j
    return None


def runtime_problem(spec, index: int) -> tuple[str, tuple] | None:
    """Why rule ``index``'s ``reuse`` or ``permute.by`` cannot run as written, as (what, key path),
    or None. Checks what the spec alone decides; what depends on the bound sites (a producer
    before the consumer, equal shapes) is checked by the ``reuse`` pass."""
    rule = spec.rules[index]
    reuse, permute = rule.reuse, rule.permute
    by = permute is not None and permute.by is not None
    reuse_path = ("rules", index, "reuse")
    if reuse is not None:

        def bad(why: str, *key: str) -> tuple[str, tuple]:
            return f"'reuse' of a block selection ({why})", reuse_path + key

        across_calls = reuse.dense_first is not None or reuse.refresh_every is not None
        if reuse.from_ is None and not across_calls:
            return bad(
                "give 'from' (a rule name or layer: reuse across layers) "
                "or 'dense_first' / 'refresh_every' (across calls)"
            )
        if reuse.from_ is not None and across_calls:
            return bad(
                "'from' (across layers) and 'dense_first' / 'refresh_every' (across calls) "
                "cannot be combined in one rule"
            )
        if not _has_selector(spec, index):
            return bad("the rule's mask has no topk/threshold selector for a reused selection to stand for")
        if by:
            return bad("a reused selection cannot be combined with a run-time permutation 'permute.by'")
        if isinstance(reuse.from_, str):
            names = [spec.rule_name(j) for j in range(len(spec.rules))]
            j = _rule_index(spec, reuse.from_)
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
                    f"rule '{reuse.from_}' selects in a run-time key order that does not carry over to another layer",
                    "from",
                )
    if by:
        path = ("rules", index, "permute")

        def bad_perm(why: str, *key: str) -> tuple[str, tuple]:
            return f"the run-time permutation 'by: {permute.by}' ({why})", path + key  # type: ignore[union-attr]

        if permute.segment is None:  # type: ignore[union-attr]
            return bad_perm("give 'segment': keys are sorted inside consecutive segments of that many tokens", "by")
        if not _has_selector(spec, index):
            return bad_perm(
                "the rule's mask has no topk/threshold selector to run in the permuted order; "
                "without one the key order changes nothing",
                "by",
            )
        segment = permute.segment  # type: ignore[union-attr]
        block_q, block_kv = spec.block_sizes(index)
        for mask in _rule_masks(spec, index):
            for sel in selectors_of(mask):
                try:
                    cfg = resolve_selector(sel, block_q, block_kv)
                except SelectorError:
                    continue  # reported by selector_problem
                if segment % cfg.block:
                    return bad_perm(
                        f"segment {segment} must be a multiple of the selector block {cfg.block} so every "
                        f"selected block lies inside one segment",
                        "segment",
                    )
    return None
