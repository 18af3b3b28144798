"""bind: the first spec rule matching a site becomes its AttentionPlan; unmatched sites stay as they are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.dtypes import DTYPES, dtype_name
from attncc.ir.plan import AttentionPlan
from attncc.ir.score_mod import ScoreMod
from attncc.passes.detect import AttentionSite
from attncc.spec import SiteShape, Spec, SpecError, plan_for
from attncc.spec.resolve import PositionError


@dataclass(frozen=True)
class BoundSite:
    """A detected site and the plan the spec gives it (rule ``rule_index``)."""

    site: AttentionSite
    plan: AttentionPlan
    rule_index: int

    @property
    def rule(self) -> str:
        return self.plan.rule


@dataclass
class BindResult:
    bound: list[BoundSite]
    unbound: list[AttentionSite]
    unsupported: list[tuple[AttentionSite, str]]

    def summary(self) -> str:
        lines = [f"site {b.site.index} -> rule '{b.rule}'\n{b.plan.describe()}" for b in self.bound]
        lines += [f"site {s.index}: no rule matches; left as it was" for s in self.unbound]
        lines += [f"site {s.index}: not rewritten: {why}" for s, why in self.unsupported]
        return "\n".join(lines)


def site_shape(site: AttentionSite) -> SiteShape:
    """What resolution needs to know about a detected site."""
    return SiteShape(
        num_heads=site.num_heads,
        q_len=site.q_len,
        kv_len=site.kv_len,
        layer=site.layer,
        module=site.module,
        num_kv_heads=site.num_kv_heads,
        head_dim=site.head_dim,
        head_dim_v=site.head_dim_v,
        dtype=dtype_name(site.dtype),
        scale=site.scale,
        model_mask=site.model_mask,
        mask_kind=site.mask_kind,
        q_positions=site.positions.kind,
        q_offset=site.q_offset,
        heads_known=site.heads_known,
        score_mod=None
        if site.softcap is None and site.alibi is None
        else ScoreMod(softcap=site.softcap, alibi=site.alibi),
    )


def bind(spec: Spec, sites: list[AttentionSite], strict: bool = False, skipped: Sequence[str] = ()) -> BindResult:
    """Plan every site a rule matches (:func:`attncc.spec.plan_for`). With ``strict``, a site no
    rule matches or a rule that matches no site is a SpecError (which lists the attentions
    detection left alone, ``skipped``, with their reasons)."""
    bound, unbound, unsupported = [], [], []
    used: set[int] = set()
    supported = {d.torch for d in DTYPES.values()}
    for site in sites:
        if site.dtype not in supported:
            unsupported.append((site, f"dtype {site.dtype} is not supported"))
            continue
        try:
            plan = plan_for(spec, site_shape(site))
        except PositionError as e:
            # the model's attention is left as written, and said so; strict makes it an error
            if strict:
                raise
            unsupported.append((site, str(e)))
            continue
        index = spec.match(site.layer, site.module)
        if plan is None or index is None:
            unbound.append(site)
            continue
        used.add(index)
        bound.append(BoundSite(site, plan, index))
    if strict:
        if unbound:
            s = unbound[0]
            raise SpecError(
                f"strict: no rule matches the attention at {s.module or '<top>'} (layer {s.layer}, "
                f"nodes {', '.join(s.node_names)}); add a rule or a catch-all `- mask: full`",
                spec.source,
            )
        for i in range(len(spec.rules)):
            if i not in used:
                left = f"; not rewritten: {'; '.join(skipped)}" if skipped else ""
                found = ", ".join(f"{s.module or '<top>'}@{s.layer}" for s in sites) or "none"
                raise spec.error(
                    f"strict: rule '{spec.rule_name(i)}' matches no attention in this graph (sites: {found}{left})",
                    ("rules", i),
                )
    return BindResult(bound, unbound, unsupported)


@dataclass(frozen=True)
class Bind:
    """Spec rule -> AttentionPlan for every detected site; sites no rule matches stay as they are."""

    name: ClassVar[str] = "bind"
    spec: Spec
    strict: bool = False

    def __call__(self, sites: list[AttentionSite], skipped: Sequence[str] = ()) -> BindResult:
        return bind(self.spec, sites, self.strict, skipped)
