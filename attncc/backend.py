"""The ``attncc`` torch.compile backend: run the pass pipeline on Dynamo's graph, then hand the
rewritten graph to inductor (default) or run it eagerly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from torch import fx
from torch._dynamo.exc import ShortenTraceback

from attncc.codegen import dump as kernel_dump
from attncc.codegen.executors import NAMES as EXECUTOR_NAMES
from attncc.codegen.files import exclusive_folder, write_file
from attncc.codegen.forward.generate import kernel_name
from attncc.config import config
from attncc.counters import counters
from attncc.ir.plan import plan_density
from attncc.passes import pipeline
from attncc.passes.detect import AttentionSite
from attncc.runtime.selection_cache import SelectionCache
from attncc.spec import Spec, SpecError, load_spec

log = logging.getLogger("attncc")

_OPTIONS = ("spec", "dump_dir", "executor", "inner", "strict", "selection_cache")
_INNERS = ("inductor", "eager")
_graph_counter = 0


@dataclass(frozen=True)
class Options:
    """Validated backend options (unset ones come from :mod:`attncc.config`)."""

    spec: Spec
    dump_dir: str | None
    executor: str
    inner: str
    strict: bool
    # call reuse state (attncc.SelectionCache); None: the process-wide default
    selection_cache: Any = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> Options:
        options = dict(options or {})
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"unknown attncc option(s) {unknown}; expected: {', '.join(_OPTIONS)}")
        spec_src = options.get("spec", {"attncc": 1, "rules": [{"mask": "full"}]})
        executor = options.get("executor", config.executor)
        inner = options.get("inner", config.inner)
        if executor not in EXECUTOR_NAMES:
            raise ValueError(f"attncc option executor={executor!r}: expected one of {', '.join(EXECUTOR_NAMES)}")
        if inner not in _INNERS:
            raise ValueError(f"attncc option inner={inner!r}: expected one of {', '.join(_INNERS)}")
        dump = options.get("dump_dir", config.dump_dir)
        cache = options.get("selection_cache")
        if cache is not None:
            if not isinstance(cache, SelectionCache):
                raise ValueError(f"attncc option selection_cache: expected an attncc.SelectionCache, got {cache!r}")
        return cls(
            load_spec(spec_src),
            str(dump) if dump else None,
            executor,
            inner,
            bool(options.get("strict", config.strict)),
            cache,
        )


def register_torch_logs() -> bool:
    """Make the ``attncc`` logger one of torch's logs: ``TORCH_LOGS="+attncc"`` (debug) or
    ``TORCH_LOGS="attncc"`` (info), and ``torch._logging.set_logs(attncc=logging.DEBUG)``. Uses
    torch's private logging registry; where it has moved, returns False and ``ATTNCC_LOG`` is
    the way to turn the log on."""
    try:
        from torch._logging import _internal as torch_logs

        if "attncc" not in torch_logs.log_registry.log_alias_to_log_qnames:
            # registered while torch imports (its backend autoload) TORCH_LOGS is parsed after
            # this; registered later, _torch_logs_from_env sets the level on first use
            torch_logs.register_log("attncc", "attncc")
        return True
    except Exception:  # a private API: never let its changes break attncc
        return False


register_torch_logs()


def _torch_logs_from_env() -> None:
    """``TORCH_LOGS`` naming ``attncc`` when torch parsed it before attncc registered its log:
    the level it asks for (``+attncc`` debug, ``attncc`` info, ``-attncc`` errors only), torch's
    log format."""
    tokens = [t.strip() for t in os.environ.get("TORCH_LOGS", "").split(",")]
    levels = {"+attncc": logging.DEBUG, "attncc": logging.INFO, "-attncc": logging.ERROR}
    hit = [levels[t] for t in tokens if t in levels]
    if not hit or log.handlers:
        return
    log.setLevel(hit[-1])
    log.propagate = False
    h = logging.StreamHandler(sys.stderr)
    try:
        from torch._logging._internal import DEFAULT_FORMATTER

        h.setFormatter(DEFAULT_FORMATTER)
    except ImportError:  # a private API
        h.setFormatter(logging.Formatter("[attncc] %(levelname)s %(message)s"))
    log.addHandler(h)


def setup_logging() -> None:
    """``ATTNCC_LOG=1|info|debug`` logs sites and bindings to stderr as ``[attncc] ...``;
    ``TORCH_LOGS="+attncc"`` (or ``attncc``) as torch's own logs."""
    level = config.log
    if not level or str(level).lower() in ("0", "false", "off"):
        _torch_logs_from_env()
        return
    lvl = logging.DEBUG if str(level).lower() == "debug" else logging.INFO
    log.setLevel(lvl)
    if not any(getattr(h, "_attncc", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[attncc] %(levelname)s %(message)s"))
        h._attncc = True  # type: ignore[attr-defined]
        log.addHandler(h)


class Dumper:
    """Writes one folder per compiled graph: the graph after every pass and manifest.json."""

    def __init__(self, root: str, gm: fx.GraphModule):
        global _graph_counter
        _graph_counter += 1
        digest = hashlib.sha256(gm.code.encode()).hexdigest()[:8]
        self.folder = exclusive_folder(root, f"graph_{_graph_counter:03d}_{digest}")
        self.step = 0

    def stage(self, name: str, gm: fx.GraphModule, summary: str) -> None:
        text = f"# after {name}\n" + (f"# {summary.replace(chr(10), chr(10) + '# ')}\n" if summary else "")
        text += gm.print_readable(print_output=False, include_stride=False, include_device=False)
        write_file(self.folder / f"{self.step:02d}_{name}.txt", text)
        self.step += 1

    def manifest(self, st: pipeline.PipelineState, gm: fx.GraphModule, example_inputs: list | None) -> None:
        """manifest.json, plus each rewritten plan's kernel files (entries under ``"kernels"``) and
        the rewritten graph as MLIR (``"mlir"``: the file, or why there is none)."""
        record = manifest(st)
        plans = [s.plan for s in st.rewritten]
        if plans:
            kernel_dump.write_kernels(self.folder, plans, manifest=record, aot=bool(config.dump_aot))
        if config.dump_mlir:
            record["mlir"] = write_mlir(self.folder / "rewritten.mlir", gm, example_inputs)
        write_file(self.folder / "manifest.json", json.dumps(record, indent=2, default=str))


def write_mlir(path: pathlib.Path, gm: fx.GraphModule, example_inputs: list | None) -> dict:
    """Write ``gm`` as MLIR in the torch dialect with torch-mlir's FX importer (``torch.export``
    of the graph, then ``fx.export_and_import``). Each ``attncc::attention`` call appears as
    ``torch.operator "torch.attncc.attention"``: the importer has no lowering for a custom op
    and keeps it opaque. Returns the manifest entry: ``{"file": name}`` or ``{"error": why}``
    (torch-mlir missing, no example inputs, or the export failed); never raises."""
    try:
        from torch_mlir import fx as mlir_fx
    except ImportError as e:
        return {"error": f"torch-mlir is not installed ({e}); pip install torch-mlir to get rewritten.mlir"}
    if example_inputs is None:
        return {"error": "no example inputs (the graph was not compiled through torch.compile)"}
    try:
        # export traces the graph with fake tensors (attncc::attention's fake impl): no attention
        # runs; its pytree deprecation warnings are torch-internal
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = mlir_fx.export_and_import(gm, *example_inputs, func_name="rewritten")
    except Exception as e:  # noqa: BLE001 - reported in the manifest, the compile goes on
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return {"error": "torch-mlir import failed: " + (msg[0] if msg else type(e).__name__)[:500]}
    write_file(path, str(module) + "\n")
    return {"file": path.name, "dialect": "torch", "attncc_op": 'torch.operator "torch.attncc.attention"'}


def site_record(s: AttentionSite, bound: dict[int, Any]) -> dict:
    """A site's manifest entry (with its plan, kernel and density when a rule bound it)."""
    rec = {
        "site": s.index,
        "module": s.module,
        "layer": s.layer,
        "source": s.source,
        "layout": s.layout,
        "num_heads": s.num_heads,
        "num_kv_heads": s.num_kv_heads,
        "q_len": s.q_len,
        "kv_len": s.kv_len,
        "head_dim": s.head_dim,
        "dtype": str(s.dtype).replace("torch.", ""),
        "scale": s.scale,
        "gqa": s.gqa,
        "model_mask": str(s.model_mask),
        "runtime_mask": s.mask_kind,
        "fx_nodes": s.node_names,
        "rule": None,
        "notes": s.notes,
    }
    b = bound.get(s.index)
    if b is not None:
        rec.update(
            {
                "rule": b.rule,
                "plan_key": b.plan.key(),
                "plan": b.plan.to_dict(),
                "kernel": kernel_name(b.plan),
                "density": None if b.plan.is_dynamic else plan_density(b.plan).per_head(),
            }
        )
    return rec


def manifest(st: pipeline.PipelineState) -> dict:
    det = st.detected
    bound = {b.site.index: b for b in st.bound.bound} if st.bound else {}
    return {
        "spec": st.spec.name,
        "executor": st.executor,
        "sites": [site_record(s, bound) for s in (det.sites if det else [])],
        "rewritten": [s.site.index for s in st.rewritten],
        "unbound": [s.index for s in (st.bound.unbound if st.bound else [])],
        "skipped": [{"module": k.module, "nodes": k.nodes, "reason": k.reason} for k in (det.skipped if det else [])],
    }


def run_pipeline(
    gm: fx.GraphModule,
    opts: Options,
    stop_after: str | None = None,
    example_inputs: list | None = None,
    count: bool = True,
) -> pipeline.PipelineState:
    """Run the passes on ``gm`` in place; with a dump folder, write it (``example_inputs`` are
    used only for the MLIR dump). ``count=False`` (explain's dry run) leaves the counters alone."""
    setup_logging()
    st = pipeline.PipelineState(opts.spec, opts.executor, opts.strict, selection_cache=opts.selection_cache)
    dumper = Dumper(opts.dump_dir, gm) if opts.dump_dir else None
    pipeline.run(gm, st, stop_after, dumper.stage if dumper else None)
    if count:
        _count(st)
    if dumper is not None:
        dumper.manifest(st, gm, example_inputs)
        log.info("dumped graph to %s", dumper.folder)
    return st


def _count(st: pipeline.PipelineState) -> None:
    counters["graphs"] += 1
    if st.detected is not None:
        counters["detected"] += len(st.detected.sites)
        counters["skipped"] += len(st.detected.skipped)
    if st.bound is not None:
        counters["unbound"] += len(st.bound.unbound)
        counters["unsupported"] += len(st.bound.unsupported)
    counters["rewritten"] += len(st.rewritten)


class CompileSpecError(SpecError, ShortenTraceback):
    """A SpecError found while compiling. Dynamo lets this kind of exception through as it is, so
    the user sees the SpecError itself (file:line: key: message), not a backend failure around it;
    it is still a SpecError (``except attncc.SpecError`` catches it)."""

    @classmethod
    def of(cls, e: SpecError) -> CompileSpecError:
        err = cls(e.message, e.source, e.line, e.column, e.path)
        err.first_useful_frame = None  # ShortenTraceback's: keep the whole traceback
        return err


def attncc_backend(gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None, **kwargs):
    """torch.compile backend: ``torch.compile(m, backend="attncc", options={...})``."""
    if kwargs:
        raise TypeError(f"attncc backend got unexpected arguments {sorted(kwargs)}; pass settings in options={{...}}")
    try:
        opts = Options.parse(options)
        run_pipeline(gm, opts, example_inputs=example_inputs)
    except CompileSpecError:
        raise
    except SpecError as e:
        raise CompileSpecError.of(e) from e
    if opts.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
