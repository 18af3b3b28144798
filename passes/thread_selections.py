"""thread-selections: rules whose block selection outlives one call get the op variants of
:mod:`attncc.runtime.selection_ops`.

* ``reuse: {from: R}`` (DELTA / TidalDecode): the nearest earlier site bound to rule ``R`` (or
  at layer ``R``) becomes ``attention_select``, which returns its selection as an extra output;
  the consuming site becomes ``attention_reuse`` and takes that value as an input. The selection
  is an explicit edge of the graph, never hidden state.
* ``reuse: {dense_first, refresh_every}`` (SparseD): ``attention_cached``, whose state lives in a
  :class:`attncc.runtime.selection_cache.SelectionCache` outside the graph.
* ``permute: {by: key_importance, segment}`` (PBS-Attn): ``attention_permuted``.

What the spec alone decides is checked by :func:`attncc.spec.runtime_problem`; what depends on
the sites (a producer before the consumer, equal shapes) is checked here, each refusal a
SpecError naming the rule.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx

import attncc.runtime.selection_ops  # noqa: F401  (registers the op variants)
from attncc.ir.selection import selectors_of
from attncc.passes.graph import commit
from attncc.passes.rewrite import RewrittenSite
from attncc.runtime import registry
from attncc.runtime.selection_cache import SelectionCache, default_selection_cache
from attncc.spec import Spec


@dataclass
class ThreadResult:
    """Sites whose call was re-targeted: (producer, consumer) pairs, call-reuse sites with their
    cache keys, and sites with a run-time key order."""

    links: list[tuple[RewrittenSite, RewrittenSite]] = field(default_factory=list)
    cached: list[tuple[RewrittenSite, str]] = field(default_factory=list)
    permuted: list[RewrittenSite] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{_at(c)} takes the selection of {_at(p)} as an input" for p, c in self.links]
        lines += [f"{_at(s)} reuses its selection across calls as '{key}'" for s, key in self.cached]
        lines += [f"{_at(s)} orders keys by importance at run time" for s in self.permuted]
        return "\n".join(lines) or "no selection outlives a call"


def _at(s: RewrittenSite) -> str:
    return f"site {s.site.index} ({s.site.module or '<top>'}, layer {s.site.layer})"


def _where(s: RewrittenSite) -> str:
    return f"{s.site.module or '<top>'} (layer {s.site.layer})"


def _retarget(graph: fx.Graph, site: RewrittenSite, target, args: tuple) -> fx.Node:
    """Replace the site's op call by ``target(*args)``; the users (getitem 0/1) move over."""
    old = site.call
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta.update({k: v for k, v in old.meta.items() if k not in ("val", "example_value")})
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    site.call = new
    return new


def _check_link(spec: Spec, site: RewrittenSite, producer: RewrittenSite) -> None:
    """The consumer's plan must read the producer's selection exactly as computed."""
    a, b = producer.plan, site.plan
    index = site.bound.rule_index
    name, path = spec.rule_name(index), ("rules", index, "reuse", "from")
    head = f"rule '{name}' at {_where(site)} reuses the selection of {_where(producer)} (rule '{producer.plan.rule}')"
    for what, x, y in (
        ("query heads", a.num_heads, b.num_heads),
        ("query lengths", a.q_len, b.q_len),
        ("key lengths", a.kv_len, b.kv_len),
        ("block sizes", (a.block_q, a.block_kv), (b.block_q, b.block_kv)),
        ("query offsets", a.q_offset, b.q_offset),
    ):
        if x != y:
            raise spec.error(
                f"{head}, but their {what} differ ({x} there, {y} here); a selection is per (head, query "
                f"block, kv block) and carries over only between attentions of the same shape",
                path,
            )
    for h in range(b.num_heads):
        wanted = selectors_of(b.programs[b.head_to_program[h]])
        if not wanted:
            continue
        given = selectors_of(a.programs[a.head_to_program[h]])
        if given != wanted:
            there = str(given[0]) if given else "none: that head computes no selection"
            raise spec.error(
                f"{head}, but head {h}'s selector {wanted[0]} is not the one computed there ({there}); write "
                f"the producer's selector so the reused selection is what the mask says",
                path,
            )


@dataclass
class _Threader:
    """The state of one pass over a graph's rewritten sites, in graph order."""

    gm: fx.GraphModule
    spec: Spec
    cache: SelectionCache
    ordered: list[RewrittenSite]
    result: ThreadResult = field(default_factory=ThreadResult)
    selection: dict[int, fx.Node] = field(default_factory=dict)
    occurrences: Counter[str] = field(default_factory=Counter)

    def permute(self, site: RewrittenSite, segment: int) -> None:
        q, k, v, mask, positions, scale, plan_key, executor = site.call.args
        args = (q, k, v, mask, positions, scale, plan_key, executor, segment)
        _retarget(self.gm.graph, site, torch.ops.attncc.attention_permuted.default, args)
        self.result.permuted.append(site)

    def producer_of(self, n: int, site: RewrittenSite, source: str | int) -> RewrittenSite:
        """The nearest site before position ``n`` bound to rule ``source`` (or at layer ``source``)."""
        if isinstance(source, int):
            earlier = [s for s in self.ordered[:n] if s.site.layer == source]
        else:
            earlier = [s for s in self.ordered[:n] if s.plan.rule == source]
        if not earlier:
            index = site.bound.rule_index
            what = f"layer {source}" if isinstance(source, int) else f"rule '{source}'"
            seen = ", ".join(f"{_where(s)} rule '{s.plan.rule}'" for s in self.ordered)
            raise self.spec.error(
                f"rule '{self.spec.rule_name(index)}' at {_where(site)} reuses the selection of {what}, but no "
                f"attention bound to it runs before this one in the compiled graph (sites in order: {seen}); a "
                f"graph break between them also separates them",
                ("rules", index, "reuse", "from"),
            )
        return earlier[-1]

    def selection_of(self, site: RewrittenSite, producer: RewrittenSite) -> fx.Node:
        """The graph value holding ``producer``'s selection (its call becomes ``attention_select``)."""
        sel = self.selection.get(producer.site.index)
        if sel is not None:
            return sel
        if producer.call.target is not torch.ops.attncc.attention.default:
            index = site.bound.rule_index
            raise self.spec.error(
                f"rule '{self.spec.rule_name(index)}' at {_where(site)} reuses the selection of {_where(producer)}, "
                f"whose rule '{producer.plan.rule}' reuses across calls or permutes keys at run time: its "
                f"selection does not carry over",
                ("rules", index, "reuse", "from"),
            )
        graph = self.gm.graph
        made = _retarget(graph, producer, torch.ops.attncc.attention_select.default, tuple(producer.call.args))
        with graph.inserting_after(made):
            sel = graph.call_function(operator.getitem, (made, 2))
        sel.meta.update({k: v for k, v in made.meta.items() if k not in ("val", "example_value")})
        self.selection[producer.site.index] = sel
        return sel

    def reuse_from(self, n: int, site: RewrittenSite, source: str | int) -> None:
        producer = self.producer_of(n, site, source)
        _check_link(self.spec, site, producer)
        sel = self.selection_of(site, producer)
        q, k, v, mask, positions, scale, plan_key, executor = site.call.args
        args = (q, k, v, mask, positions, scale, sel, plan_key, executor)
        _retarget(self.gm.graph, site, torch.ops.attncc.attention_reuse.default, args)
        self.selection[site.site.index] = sel
        self.result.links.append((producer, site))

    def reuse_across_calls(self, site: RewrittenSite, dense_first: int, refresh_every: int) -> None:
        plan = site.plan
        dense = dataclasses.replace(
            plan,
            programs=(site.site.model_mask,),
            head_to_program=(0,) * plan.num_heads,
            rule=f"{self.spec.rule_name(site.bound.rule_index)} (dense)",
        )
        where = f"{site.site.module or '<top>'}@{site.site.layer}"
        site_key = f"{where}#{self.occurrences[where]}"
        self.occurrences[where] += 1
        q, k, v, mask, positions, scale, plan_key, executor = site.call.args
        dense_key = registry.register_plan(dense)
        args = (q, k, v, mask, positions, scale, plan_key, dense_key, executor, self.cache.key, site_key)
        _retarget(self.gm.graph, site, torch.ops.attncc.attention_cached.default, (*args, dense_first, refresh_every))
        self.result.cached.append((site, site_key))


def thread_selections(
    gm: fx.GraphModule, sites: list[RewrittenSite], spec: Spec, cache: SelectionCache | None = None
) -> ThreadResult:
    """Re-target the op calls of rewritten ``sites`` whose rule reuses or permutes at run time."""
    graph = gm.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    ordered = sorted(sites, key=lambda s: position[s.call])
    threader = _Threader(gm, spec, cache or default_selection_cache(), ordered)
    for n, site in enumerate(ordered):
        rule = spec.rules[site.bound.rule_index]
        if rule.permute is not None and rule.permute.by is not None and rule.permute.segment is not None:
            threader.permute(site, rule.permute.segment)
        elif rule.reuse is not None and rule.reuse.from_ is not None:
            threader.reuse_from(n, site, rule.reuse.from_)
        elif rule.reuse is not None:
            threader.reuse_across_calls(site, rule.reuse.dense_first or 0, rule.reuse.refresh_every or 0)
    result = threader.result
    if result.links or result.cached or result.permuted:
        commit(gm)
    return result


@dataclass(frozen=True)
class ThreadSelections:
    """Selections that outlive a call: explicit graph values between layers, a cache across calls."""

    name: ClassVar[str] = "thread-selections"
    spec: Spec
    cache: SelectionCache | None = None

    def __call__(self, gm: fx.GraphModule, sites: list[RewrittenSite]) -> ThreadResult:
        return thread_selections(gm, sites, self.spec, self.cache)
