"""The pass pipeline: one flat list of named stages, run in order on a Dynamo FX graph."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

from attncc.passes.bind import Bind, BindResult
from attncc.passes.detect import Detect, DetectResult
from attncc.passes.normalize import Normalize, NormalizeResult
from attncc.passes.rewrite import Rewrite, RewriteResult, RewrittenSite
from attncc.passes.thread_selections import ThreadResult, ThreadSelections
from attncc.runtime.selection_cache import SelectionCache
from attncc.spec import Spec

log = logging.getLogger("attncc")


@dataclass
class PipelineState:
    """The options of one compile and what each stage learned about the graph (read by the
    dump, explain and the counters)."""

    spec: Spec
    executor: str
    strict: bool = False
    selection_cache: SelectionCache | None = None
    normalized: NormalizeResult | None = None
    detected: DetectResult | None = None
    bound: BindResult | None = None
    rewrite_result: RewriteResult | None = None
    threaded: ThreadResult | None = None

    @property
    def rewritten(self) -> list[RewrittenSite]:
        return self.rewrite_result.rewritten if self.rewrite_result else []


def _normalize(gm: fx.GraphModule, st: PipelineState) -> str:
    st.normalized = Normalize()(gm)
    return st.normalized.summary()


def _detect(gm: fx.GraphModule, st: PipelineState) -> str:
    st.detected = Detect()(gm)
    for s in st.detected.sites:
        log.info("site %d: %s", s.index, s.describe())
        for note in s.notes:
            log.debug("site %d: %s", s.index, note)
    for sk in st.detected.skipped:
        log.info("not rewritten: %s", sk.describe())
    return st.detected.summary()


def _bind(gm: fx.GraphModule, st: PipelineState) -> str:
    assert st.detected is not None
    st.bound = Bind(st.spec, st.strict)(st.detected.sites, [sk.describe() for sk in st.detected.skipped])
    for b in st.bound.bound:
        s = b.site
        log.info("site %d (%s, layer %d) -> rule '%s', plan %s", s.index, s.module, s.layer, b.rule, b.plan.key())
    for s in st.bound.unbound:
        log.info("site %d (%s, layer %d): no rule matches; left as it was", s.index, s.module, s.layer)
    for s, why in st.bound.unsupported:
        log.info("site %d: not rewritten: %s", s.index, why)
    return st.bound.summary()


def _rewrite(gm: fx.GraphModule, st: PipelineState) -> str:
    assert st.bound is not None
    st.rewrite_result = Rewrite(st.executor)(gm, st.bound.bound)
    return st.rewrite_result.summary()


def _thread_selections(gm: fx.GraphModule, st: PipelineState) -> str:
    st.threaded = ThreadSelections(st.spec, st.selection_cache)(gm, st.rewritten)
    return st.threaded.summary()


Stage = Callable[[fx.GraphModule, PipelineState], str]

PIPELINE: list[tuple[str, Stage]] = [
    # no eval-mode dropout or same-dtype cast between the softmax and PV hides an attention
    (Normalize.name, _normalize),
    # sites in canonical roles, with the model's own mask recovered
    (Detect.name, _detect),
    # spec rule -> AttentionPlan; unmatched sites are left alone
    (Bind.name, _bind),
    # site subgraph -> one attncc::attention call
    (Rewrite.name, _rewrite),
    # selections that outlive a call: explicit values between layers, a cache across calls
    (ThreadSelections.name, _thread_selections),
]


def run(
    gm: fx.GraphModule,
    st: PipelineState,
    stop_after: str | None = None,
    on_stage: Callable[[str, fx.GraphModule, str], None] | None = None,
) -> PipelineState:
    """Run the stages in order (up to and including ``stop_after``), verifying the graph between
    them; ``on_stage(name, gm, summary)`` sees the graph after each stage."""
    if stop_after is not None and stop_after not in dict(PIPELINE):
        raise ValueError(f"unknown stage '{stop_after}'; stages: {', '.join(name for name, _ in PIPELINE)}")
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
