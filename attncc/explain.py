"""``attncc.explain(model, *args, spec=...)``: what the compiler would do to each attention. The model
is traced by Dynamo and its outputs are not computed, except where a site's density depends on the
inputs (a data-dependent selection, a run-time mask tensor such as padding): then the model runs
once on the given inputs through ``torch.compile(backend="attncc")`` and those sites report the
density they really had (``measure=False`` keeps explain a dry run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attncc import draw
from attncc.backend import Options, run_pipeline
from attncc.codegen import executors
from attncc.codegen.forward.generate import kernel_name
from attncc.codegen.selectors.layout import dense_selected_mask
from attncc.ir.documents import same_document
from attncc.ir.plan import AttentionPlan, plan_density, ranges
from attncc.passes.bind import Bind
from attncc.passes.graph import val


def head_density(plan: AttentionPlan) -> list[float] | None:
    """Fraction of (query, key) pairs each head may attend (structural mask only); None for
    plans whose blocks are selected from the data at run time."""
    return None if plan.is_dynamic else plan_density(plan).per_head()


@dataclass
class SiteInfo:
    """One attention as attncc sees it."""

    module: str
    layer: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    scale: float
    source: str
    layout: str
    model_mask: str
    runtime_mask: str | None
    rule: str | None
    density: list[float] | None
    kernel: str | None
    fx_nodes: list[str] = field(default_factory=list)
    plan: AttentionPlan | None = None
    notes: list[str] = field(default_factory=list)
    #: the blocks a data-dependent site's call selected on the given inputs, ``[B, H, nq, nk]``
    #: kernel blocks (None when not measured)
    selected: torch.Tensor | None = None


@dataclass
class Report:
    """``.sites`` (one SiteInfo per detected attention, in graph order), ``.skipped`` (attention-like
    subgraphs left untouched, with reasons) and ``.graphs`` (number of Dynamo graphs)."""

    sites: list[SiteInfo]
    skipped: list[str]
    graphs: int

    def __str__(self) -> str:
        cols = [
            "#",
            "module",
            "layer",
            "heads",
            "kv",
            "q_len",
            "kv_len",
            "dim",
            "dtype",
            "mask",
            "rule",
            "density",
            "kernel",
        ]
        rows = []
        for i, s in enumerate(self.sites):
            dens = "-" if s.density is None else _density_text(s.density)
            mask = s.model_mask + (f"+{s.runtime_mask}" if s.runtime_mask else "")
            rows.append(
                [
                    str(i),
                    s.module or "<top>",
                    str(s.layer),
                    str(s.num_heads),
                    str(s.num_kv_heads),
                    str(s.q_len),
                    str(s.kv_len),
                    str(s.head_dim),
                    s.dtype,
                    mask,
                    s.rule or "(unbound)",
                    dens,
                    s.kernel or "-",
                ]
            )
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        lines.append(f"{len(self.sites)} attention sites in {self.graphs} graph(s)")
        lines += [f"not rewritten: {s}" for s in self.skipped]
        return "\n".join(lines)

    def panels(self, batch: int = 0) -> list[draw.Panel]:
        """The block maps :meth:`draw` draws, per bound site and head (heads with the same map
        share a panel): a data-dependent site's blocks under the selection measured on the given
        inputs (sequence ``batch`` of the batch), a static site's block map. ValueError when a
        data-dependent site was not measured (``explain(..., measure=False)``)."""
        out: list[draw.Panel] = []
        for i, s in enumerate(self.sites):
            plan = s.plan
            if plan is None:
                continue
            where = f"#{i} {s.module or '<top>'} layer {s.layer}"
            if plan.is_dynamic:
                if s.selected is None:
                    raise ValueError(
                        f"site {where} selects its blocks from the data and its selection was not measured: "
                        "run attncc.explain(model, *inputs, spec=...) with measure=True (the default) to draw it"
                    )
                maps = [draw.selected_image(plan, s.selected[batch], h) for h in range(plan.num_heads)]
                groups: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
                for h, (img, labels) in enumerate(maps):
                    same = next((g for g in groups if torch.equal(g[1], img)), None)
                    if same is None:
                        groups.append(([h], img, labels))
                    else:
                        same[0].append(h)
                for heads, img, labels in groups:
                    title = f"{where}, heads {ranges(heads)}\nmeasured selection ({s.rule})"
                    out.append(draw.Panel(img, labels, title, draw.extent(plan)))
                continue
            for p in range(len(plan.programs)):
                img, labels = draw.static_image(plan, p)
                title = f"{where}, heads {ranges(plan.heads_of(p))}\n{draw.shorten(str(plan.programs[p]), 44)}"
                if plan.permute is not None:
                    title += "\n(tiled order)"
                if s.runtime_mask:
                    title += f"\n(+ {s.runtime_mask} mask tensor, not drawn)"
                out.append(draw.Panel(img, labels, title, draw.extent(plan)))
        return out

    def draw(self, path: str, batch: int = 0) -> None:
        """Write the PNG ``path`` of :meth:`panels` (the first :data:`attncc.draw.PANELS`). Needs
        matplotlib."""
        panels = self.panels(batch)
        if not panels:
            raise ValueError("no attention site is bound to a rule: there is no block map to draw")
        note = None if len(panels) <= draw.PANELS else f"the first {draw.PANELS} of {len(panels)} block maps"
        try:
            draw.save(path, panels, note)
        except ImportError as e:
            raise ImportError(f"Report.draw needs matplotlib ({e}); pip install matplotlib") from e


def _density_text(d: list[float]) -> str:
    if len(set(d)) == 1:
        return f"{d[0]:.3f}"
    return "/".join(f"{x:.2f}" for x in d)


def explain(
    model: Any, *args: Any, spec: Any = None, measure: bool = True, png: str | None = None, **kwargs: Any
) -> Report:
    """Trace ``model(*args, **kwargs)`` with Dynamo, detect and bind every attention (no rewrite)
    and report it. Sites whose density depends on the inputs (data-dependent selection, run-time
    mask tensors) are measured by running the model once on these inputs (``measure``); every
    other density is the structural one, and no attention is computed for it. ``png``: also draw
    the block maps there (:meth:`Report.draw`)."""
    # a dry run: no dump folder (even with ATTNCC_DUMP_DIR set) and no counters
    opts = Options.parse({"spec": spec, "dump_dir": None} if spec is not None else {"dump_dir": None})
    sites: list[SiteInfo] = []
    skipped: list[str] = []
    graphs = 0

    def capture(gm, example_inputs, **_):
        nonlocal graphs
        graphs += 1
        st = run_pipeline(gm, opts, stop_after=Bind.name, count=False)
        assert st.detected is not None and st.bound is not None
        bound = {b.site.index: b for b in st.bound.bound}
        for s in st.detected.sites:
            b = bound.get(s.index)
            plan = b.plan if b is not None else None
            sites.append(
                SiteInfo(
                    module=s.module,
                    layer=s.layer,
                    num_heads=s.num_heads,
                    num_kv_heads=s.num_kv_heads,
                    q_len=s.q_len,
                    kv_len=s.kv_len,
                    head_dim=s.head_dim,
                    dtype=str(s.dtype).replace("torch.", ""),
                    scale=s.scale,
                    source=s.source,
                    layout=s.layout,
                    model_mask=str(s.model_mask),
                    runtime_mask=s.mask_kind,
                    rule=b.rule if b is not None else None,
                    density=head_density(plan) if plan is not None else None,
                    kernel=kernel_name(plan) if plan is not None else None,
                    fx_nodes=s.node_names,
                    plan=plan,
                    notes=list(s.notes),
                )
            )
        skipped.extend(k.describe() for k in st.detected.skipped)
        return _placeholder_outputs(gm)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=capture, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    pending = [s for s in sites if s.plan is not None and (s.plan.is_dynamic or s.plan.mask_kind is not None)]
    if measure and pending:
        measured = measure_densities(model, args, kwargs, spec)
        for s in pending:
            assert s.plan is not None
            # sites in graph order are the calls in call order; the key leaves the module out: sites
            # with equal plans share one registered plan, whose name is the first site's
            calls = measured.get((s.plan.rule, s.plan.q_len, s.plan.kv_len))
            got = calls.pop(0) if calls else None
            if got is not None:
                s.density, s.selected = got
                what = "selection" if s.plan.is_dynamic else "mask tensor"
                s.notes.append(f"density measured on the given inputs (the {what} of this call)")
    report = Report(sites, skipped, graphs)
    if png is not None:
        report.draw(png)
    return report


def allowed_fraction(plan: AttentionPlan, mask: torch.Tensor | None, selected: torch.Tensor | None) -> list[float]:
    """Per head, the fraction of (query, key) pairs one call allowed: the plan's mask (under the
    call's block selection) and the model's mask tensor (bool: True may attend; additive: a
    finite value above half the dtype's lowest; documents: a key of the query's document),
    averaged over the batch."""
    dev = selected.device if selected is not None else (mask.device if mask is not None else None)
    allowed = dense_selected_mask(plan, selected) if selected is not None else plan.dense_mask(dev).unsqueeze(0)
    if mask is not None and plan.mask_kind == "documents":
        allowed = allowed & same_document(mask, plan.q_len, plan.q_offset).to(allowed.device)
    elif mask is not None:
        ok = mask if mask.dtype == torch.bool else (mask > torch.finfo(mask.dtype).min / 2) & mask.isfinite()
        allowed = allowed & ok.to(allowed.device)
    return [float(x) for x in allowed.float().mean(dim=(0, 2, 3)).tolist()]


def measure_densities(
    model: Any, args: tuple, kwargs: dict, spec: Any
) -> dict[tuple, list[tuple[list[float], torch.Tensor | None]]]:
    """Run ``model(*args, **kwargs)`` once compiled by attncc with ``spec`` (no dump) and record,
    per site key (rule, lengths), in call order, the per-head fraction of pairs each call
    allowed and the blocks it selected (a copy on the CPU; None for a static plan)."""
    seen: dict[tuple, list[tuple[list[float], torch.Tensor | None]]] = {}

    def observe(plan: AttentionPlan, mask: torch.Tensor | None, selected: torch.Tensor | None) -> None:
        if plan.is_dynamic or mask is not None:
            key = (plan.rule, plan.q_len, plan.kv_len)
            kept = selected.detach().to("cpu", copy=True) if selected is not None else None
            seen.setdefault(key, []).append((allowed_fraction(plan, mask, selected), kept))

    torch._dynamo.reset()
    try:
        with executors.observing(observe), torch.no_grad():
            opts = {"spec": spec, "dump_dir": None}
            torch.compile(model, backend="attncc", options=opts, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return seen


def _placeholder_outputs(gm: torch.fx.GraphModule):
    """A stand-in for the graph that returns zeros of the output shapes (nothing is computed)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    specs = []
    for a in (
        torch.fx.node.map_arg(out_node.args[0], lambda n: n)
        if isinstance(out_node.args[0], (list, tuple))
        else [out_node.args[0]]
    ):
        v = val(a) if isinstance(a, torch.fx.Node) else a
        specs.append(v)

    def run(*_args):
        outs = []
        for v in specs:
            if isinstance(v, torch.Tensor):
                outs.append(torch.zeros(tuple(int(s) for s in v.shape), dtype=v.dtype, device=v.device))
            else:
                outs.append(v)
        return tuple(outs) if isinstance(out_node.args[0], (list, tuple)) else outs[0]

    return run
