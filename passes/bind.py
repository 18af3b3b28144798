"""bind: the first spec rule matching a site becomes its AttentionPlan; unmatched sites stay as they are."""

from __future__ import annotations

from dataclasses import dataclass

from attncc.passes.detect import AttentionSite

from attncc import masks as M
from attncc import spec as S
from attncc.plan import AttentionPlan, DTypeName

_DTYPES: dict[str, DTypeName] = {
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.float64": "float64",
}


@dataclass
class BindResult:
    bound: list[AttentionSite]
    unbound: list[AttentionSite]
    unsupported: list[tuple[AttentionSite, str]]


def _check_static(spec: S.Spec, index: int) -> None:
    """Rules whose meaning is decided at run time cannot be bound by the compile-time backend."""
    checker = getattr(S, "check_executable", None)
    if checker is not None:
        checker(spec, index)
        return
    rule = spec.rules[index]
    name = spec.rule_name(index)
    base, overrides = spec._rule_masks[index]
    for where, mask in [(("rules", index, "mask"), base)] + [
        (("rules", index, "heads", key), m) for key, _, m in overrides
    ]:
        if mask.is_dynamic:
            raise spec.error(
                f"rule '{name}' selects blocks from the data at run time ({mask}); the attncc "
                f"backend binds static masks only",
                where,
            )
    if rule.permute is not None and rule.permute.by is not None:
        raise spec.error(
            f"rule '{name}' permutes tokens by a run-time score (by: {rule.permute.by}); the attncc "
            f"backend binds static grid/tile permutations only",
            ("rules", index, "permute", "by"),
        )
    if rule.reuse is not None:
        raise spec.error(
            f"rule '{name}' reuses a selection across layers or calls; the attncc backend binds static masks only",
            ("rules", index, "reuse"),
        )


def plan_for(spec: S.Spec, site: AttentionSite) -> AttentionPlan | None:
    """The plan the spec gives ``site``, or None when no rule matches. Raises SpecError for rules
    that cannot apply to this site (dynamic rules, head index out of range, lengths that do not
    fit a tile3d grid)."""
    policy = S.resolve(spec, site.layer, site.module, site.num_heads)
    if policy is None:
        return None
    _check_static(spec, policy.rule_index)
    if (
        not site.heads_known
        and any(p.depends_on_head for p in policy.programs)
        or (not site.heads_known and len(policy.programs) > 1)
    ):
        raise spec.error(
            f"rule '{policy.rule}' is head-dependent but the head count of site {site.module or '<top>'} "
            f"is not visible in the graph ([B*H, S, D] operands)",
            ("rules", policy.rule_index),
        )
    model = site.model_mask
    programs = tuple(M.conj(p, model) for p in policy.programs)
    for p in programs:
        for node in p.walk():
            if isinstance(node, M.Tile3D):
                try:
                    node.check_len(site.q_len, "query")
                    node.check_len(site.kv_len, "key")
                except (M.MaskError, ValueError) as e:
                    raise spec.error(
                        f"rule '{policy.rule}' at {site.module or '<top>'}: {e}", ("rules", policy.rule_index, "mask")
                    ) from None
    try:
        return AttentionPlan(
            programs=programs,
            head_to_program=policy.head_to_program,
            num_heads=site.num_heads,
            num_kv_heads=site.num_kv_heads,
            q_len=site.q_len,
            kv_len=site.kv_len,
            head_dim=site.head_dim,
            head_dim_v=site.head_dim_v,
            dtype=_DTYPES[str(site.dtype)],
            scale=site.scale,  # type: ignore[arg-type]
            block_q=policy.block_q,
            block_kv=policy.block_kv,
            permute=policy.permute,
            mask_kind=site.mask_kind,
            rule=policy.rule,
            name=site.module,
        )  # type: ignore[arg-type]
    except ValueError as e:
        raise spec.error(
            f"rule '{policy.rule}' at {site.module or '<top>'}: {e}", ("rules", policy.rule_index)
        ) from None


def bind(spec: S.Spec, sites: list[AttentionSite], strict: bool = False) -> BindResult:
    """Attach a plan to every site a rule matches. With ``strict``, a site no rule matches or a
    rule that matches no site is a SpecError."""
    bound, unbound, unsupported = [], [], []
    used: set[int] = set()
    for site in sites:
        if str(site.dtype) not in _DTYPES:
            unsupported.append((site, f"dtype {site.dtype} is not supported"))
            continue
        plan = plan_for(spec, site)
        if plan is None:
            unbound.append(site)
            continue
        site.plan, site.rule = plan, plan.rule
        used.add(spec.match(site.layer, site.module))  # type: ignore[arg-type]
        bound.append(site)
    if strict:
        if unbound:
            s = unbound[0]
            raise S.SpecError(
                f"strict: no rule matches the attention at {s.module or '<top>'} (layer {s.layer}, "
                f"nodes {', '.join(s.node_names)}); add a rule or a catch-all `- mask: full`",
                spec._source,
            )
        for i in range(len(spec.rules)):
            if i not in used:
                raise spec.error(
                    f"strict: rule '{spec.rule_name(i)}' matches no attention in this graph "
                    f"(sites: {', '.join(f'{s.module}@{s.layer}' for s in sites) or 'none'})",
                    ("rules", i),
                )
    return BindResult(bound, unbound, unsupported)
