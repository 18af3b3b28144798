"""reuse: rules whose selection outlives one call get the op variants of attncc.op_dynamic.

* ``reuse: {from: R}`` (DELTA / TidalDecode): the nearest earlier site bound to rule ``R`` (or
  at layer ``R``) becomes ``attention_select``, which returns its selection as an extra output;
  the consuming site becomes ``attention_reuse`` and takes that value as an input. The selection
  is an explicit edge of the graph, never hidden state.
* ``reuse: {dense_first, refresh_every}`` (SparseD): ``attention_cached``, whose state lives in a
  :class:`attncc.selection_cache.SelectionCache` outside the graph.
* ``permute: {by: key_importance, segment}`` (PBS-Attn): ``attention_permuted``.

What the spec alone decides is checked by :func:`attncc.selection.runtime_problem`; what
depends on the sites (a producer before the consumer, equal shapes) is checked
here, each refusal a SpecError naming the rule.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from attncc.passes.detect import AttentionSite
from torch import fx

import attncc.op_dynamic  # noqa: F401  (registers the op variants)
from attncc import registry
from attncc.plan import AttentionPlan
from attncc.selection import selectors_of
from attncc.selection_cache import SelectionCache, default_selection_cache
from attncc.spec import Spec


@dataclass
class ReuseResult:
    """Sites whose call was re-targeted: (producer, consumer) pairs, call-reuse sites with their
    cache keys, and sites with a run-time key order."""

    links: list[tuple[AttentionSite, AttentionSite]] = field(default_factory=list)
    cached: list[tuple[AttentionSite, str]] = field(default_factory=list)
    permuted: list[AttentionSite] = field(default_factory=list)

    def summary(self) -> str:
        def at(s: AttentionSite) -> str:
            return f"site {s.index} ({s.module or '<top>'}, layer {s.layer})"

        lines = [f"{at(c)} takes the selection of {at(p)} as an input" for p, c in self.links]
        lines += [f"{at(s)} reuses its selection across calls as '{key}'" for s, key in self.cached]
        lines += [f"{at(s)} orders keys by importance at run time" for s in self.permuted]
        return "\n".join(lines) or "no selection outlives a call"


def _where(site: AttentionSite) -> str:
    return f"{site.module or '<top>'} (layer {site.layer})"


def _retarget(graph: fx.Graph, site: AttentionSite, target, args: tuple) -> fx.Node:
    """Replace the site's op call by ``target(*args)``; the users (getitem 0/1) move over."""
    old = site.call
    assert old is not None
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta.update({k: v for k, v in old.meta.items() if k not in ("val", "example_value")})
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    site.call = new
    return new


def _check_link(spec: Spec, index: int, site: AttentionSite, producer: AttentionSite) -> None:
    """The consumer's plan must read the producer's selection exactly as computed."""
    a, b = producer.plan, site.plan
    assert isinstance(a, AttentionPlan) and isinstance(b, AttentionPlan)
    name, path = spec.rule_name(index), ("rules", index, "reuse", "from")
    head = f"rule '{name}' at {_where(site)} reuses the selection of {_where(producer)} (rule '{producer.rule}')"
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


def thread_selections(
    gm: fx.GraphModule,
    sites: list[AttentionSite],
    spec: Spec,
    executor: str,
    cache: SelectionCache | None = None,
) -> ReuseResult:
    """Re-target the op calls of rewritten ``sites`` whose rule reuses or permutes at run time."""
    graph = gm.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    ordered = sorted((s for s in sites if s.call is not None), key=lambda s: position[s.call])
    result = ReuseResult()
    selection: dict[int, fx.Node] = {}
    occurrences: Counter[str] = Counter()
    for n, site in enumerate(ordered):
        index = spec.match(site.layer, site.module)
        assert index is not None and isinstance(site.plan, AttentionPlan)
        rule, name = spec.rules[index], spec.rule_name(index)
        q, k, v, mask, plan_key, op_executor = site.call.args  # type: ignore[union-attr]
        if rule.permute is not None and rule.permute.by is not None:
            permuted = (q, k, v, mask, plan_key, op_executor, rule.permute.segment)
            _retarget(graph, site, torch.ops.attncc.attention_permuted.default, permuted)
            result.permuted.append(site)
            continue
        reuse = rule.reuse
        if reuse is None:
            continue
        if reuse.from_ is not None:
            source = reuse.from_
            if isinstance(source, int):
                earlier = [s for s in ordered[:n] if s.layer == source]
            else:
                earlier = [s for s in ordered[:n] if s.rule == source]
            if not earlier:
                what = f"layer {source}" if isinstance(source, int) else f"rule '{source}'"
                seen = ", ".join(f"{_where(s)} rule '{s.rule}'" for s in ordered)
                raise spec.error(
                    f"rule '{name}' at {_where(site)} reuses the selection of {what}, but no attention bound to "
                    f"it runs before this one in the compiled graph (sites in order: {seen}); a graph break "
                    f"between them also separates them",
                    ("rules", index, "reuse", "from"),
                )
            producer = earlier[-1]
            _check_link(spec, index, site, producer)
            sel = selection.get(producer.index)
            if sel is None:
                if producer.call.target is not torch.ops.attncc.attention.default:  # type: ignore[union-attr]
                    raise spec.error(
                        f"rule '{name}' at {_where(site)} reuses the selection of {_where(producer)}, whose rule "
                        f"'{producer.rule}' reuses across calls or permutes keys at run time: its selection "
                        f"does not carry over",
                        ("rules", index, "reuse", "from"),
                    )
                made = _retarget(
                    graph,
                    producer,
                    torch.ops.attncc.attention_select.default,
                    tuple(producer.call.args),  # type: ignore[union-attr]
                )
                with graph.inserting_after(made):
                    sel = graph.call_function(operator.getitem, (made, 2))
                sel.meta.update({k: v for k, v in made.meta.items() if k not in ("val", "example_value")})
                selection[producer.index] = sel
            reused = (q, k, v, mask, sel, plan_key, op_executor)
            _retarget(graph, site, torch.ops.attncc.attention_reuse.default, reused)
            selection[site.index] = sel
            result.links.append((producer, site))
            continue
        cache = cache or default_selection_cache()
        dense = dataclasses.replace(
            site.plan, programs=(site.model_mask,), head_to_program=(0,) * site.plan.num_heads, rule=f"{name} (dense)"
        )
        where = f"{site.module or '<top>'}@{site.layer}"
        site_key = f"{where}#{occurrences[where]}"
        occurrences[where] += 1
        args = (
            q,
            k,
            v,
            mask,
            plan_key,
            registry.register_plan(dense),
            op_executor,
            cache.key,
            site_key,
            reuse.dense_first or 0,
            reuse.refresh_every or 0,
        )
        _retarget(graph, site, torch.ops.attncc.attention_cached.default, args)
        result.cached.append((site, site_key))
    if result.links or result.cached or result.permuted:
        graph.lint()
        gm.recompile()
    return result
