"""The pass pipeline: one flat list of named stages, run in order on a Dynamo FX graph."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from attncc.passes.bind import BindResult, bind
from attncc.passes.detect import DetectResult, detect
from attncc.passes.normalize import normalize
from attncc.passes.reuse import ReuseResult, thread_selections
from attncc.passes.rewrite import rewrite
from torch import fx

from attncc.spec import Spec

log = logging.getLogger("attncc")


@dataclass
class PipelineState:
    """What the passes learn about one graph, read by the dump, explain and the counters."""

    spec: Spec
    executor: str
    strict: bool = False
    detected: DetectResult | None = None
    bound: BindResult | None = None
    rewritten: list = field(default_factory=list)
    selection_cache: object = None
    reused: ReuseResult | None = None
    snapshots: list[tuple[str, str]] = field(default_factory=list)


def _normalize(gm: fx.GraphModule, st: PipelineState) -> str:
    r = normalize(gm)
    return f"removed {r.removed} identity ops (eval dropout, same-dtype casts)"


def _detect(gm: fx.GraphModule, st: PipelineState) -> str:
    st.detected = detect(gm)
    for s in st.detected.sites:
        log.info("site %d: %s", s.index, s.describe())
        for note in s.notes:
            log.debug("site %d: %s", s.index, note)
    for sk in st.detected.skipped:
        log.info("not rewritten: %s", sk.describe())
    return "\n".join(
        [f"site {s.index}: {s.describe()}" for s in st.detected.sites]
        + [f"skipped: {sk.describe()}" for sk in st.detected.skipped]
    )


def _bind(gm: fx.GraphModule, st: PipelineState) -> str:
    assert st.detected is not None
    st.bound = bind(st.spec, st.detected.sites, strict=st.strict)
    lines = []
    for s in st.bound.bound:
        log.info("site %d (%s, layer %d) -> rule '%s', plan %s", s.index, s.module, s.layer, s.rule, s.plan.key())
        lines.append(f"site {s.index} -> rule '{s.rule}'\n{s.plan.describe()}")
    for s in st.bound.unbound:
        log.info("site %d (%s, layer %d): no rule matches; left as it was", s.index, s.module, s.layer)
        lines.append(f"site {s.index}: no rule matches; left as it was")
    for s, why in st.bound.unsupported:
        log.info("site %d: not rewritten: %s", s.index, why)
        lines.append(f"site {s.index}: not rewritten: {why}")
    return "\n".join(lines)


def _rewrite(gm: fx.GraphModule, st: PipelineState) -> str:
    assert st.bound is not None
    st.rewritten = rewrite(gm, st.bound.bound, st.executor).rewritten
    return f"rewrote {len(st.rewritten)} sites into attncc::attention"


def _reuse(gm: fx.GraphModule, st: PipelineState) -> str:
    st.reused = thread_selections(gm, st.rewritten, st.spec, st.executor, st.selection_cache)  # type: ignore[arg-type]
    return st.reused.summary()


Stage = Callable[[fx.GraphModule, PipelineState], str]

PIPELINE: list[tuple[str, Stage]] = [
    # one spelling per operation, and no eval-mode dropout between softmax and PV
    ("normalize", _normalize),
    # sites in canonical roles, with the model's own mask recovered
    ("detect-attention", _detect),
    # spec rule -> AttentionPlan; unmatched sites are left alone
    ("bind-spec", _bind),
    # site subgraph -> one attncc::attention call
    ("rewrite", _rewrite),
    # selections that outlive a call: explicit values between layers, a cache across calls
    ("thread-selections", _reuse),
]


def run(
    gm: fx.GraphModule,
    st: PipelineState,
    stop_after: str | None = None,
    on_stage: Callable[[str, fx.GraphModule, str], None] | None = None,
) -> PipelineState:
    """Run the stages in order (up to and including ``stop_after``), verifying the graph between
    them; ``on_stage(name, gm, summary)`` sees the graph after each stage."""
    if on_stage is not None:
        on_stage("input", gm, "")
    for name, stage in PIPELINE:
        summary = stage(gm, st)
        gm.graph.lint()
        if on_stage is not None:
            on_stage(name, gm, summary)
        if name == stop_after:
            break
    return st
