"""Pattern importers: the files sparse-attention projects ship, as attncc specs.

``attncc import duo DIR`` reads a DuoAttention pattern folder (the format its
``duo_attn.utils.load_attn_pattern`` reads): ``full_attention_heads.tsv``, one row per layer and
one tab-separated gate in [0, 1] per kv head (values outside are clipped, as DuoAttention does),
and ``config.json`` with ``sink_size`` and ``recent_size``. A kv head whose gate is at least the
threshold (default 0.5; or ``--sparsity s``: the ``s`` quantile of all gates, as DuoAttention's
``sparsify_attention_heads``) is a retrieval head: full causal attention. Every other head is a
streaming head: the ``sink_size`` first tokens and the ``recent_size`` newest (the query and the
``recent_size - 1`` before it), causally. Query heads follow their kv head (``--group``: query heads
per kv head). The spec printed has one rule per distinct layer pattern, with comments saying
which rows and gates each rule came from.

``attncc import xattention FILE`` reads XAttention's per-layer, per-head thresholds: a JSON list
with one entry per layer, a number (every head) or a list of numbers (one per query head), as
``torch.Tensor.tolist()`` writes the ``[layers, heads]`` tensor its ``profile_threshold.py``
computes; or a Python file of such tables assigned to names (``xattn/threshold/llama_threshold.py``,
read with ``ast.literal_eval``: nothing in it runs), one picked by ``--table`` (default
``llama_fuse_<stride>``, as its ``FastPrefillConfig`` picks, or the only table). A head with
threshold ``tau`` keeps XAttention's always-kept blocks (the first kv block and the diagonal
block) and the fewest other blocks holding ``tau`` of the antidiagonal score mass:
``{all: [causal, {any: [{sink: B}, {chunk: B}, {threshold: {tau, score: antidiagonal, stride,
block: B}}]}]}``; ``tau`` 0 keeps the two static parts only.

``attncc import minference FILE.json`` reads MInference's per-model best-pattern file (what
``minference_forward.py`` reads into ``best_pattern``): a list with one object per layer
mapping a query head index (a string) to ``[type, vertical_size, slash_size, score]``:
``stream_llm`` (``a_shape`` accepted as its synonym) is ``streaming_forward(n_init=vertical_size,
n_local=slash_size)``: ``{all: [causal, {any: [{sink: v}, {window: s}]}]}``;
``vertical_and_slash`` is ``{all: [causal, {vertical_slash: {vertical: max(v, 30), slash: max(s,
50)}}]}`` (MInference's clamps); ``block_sparse`` is ``block_sparse_attention(top_k=100)``, 64-token
blocks ranked by mean-pooled ``q . k``: ``{all: [causal, {topk: {k: 100, score: mean_pool, block:
64}}]}`` (MInference ignores the file's sizes there). A head missing from a layer's object gets
MInference's default, ``vertical_and_slash`` 1000 / 6096, which is each rule's ``mask``; the
heads with other patterns are ``heads:`` overrides. The ``score`` entry is the search's
measurement and is not used.
"""

from __future__ import annotations

import ast
import json
import math
import pathlib
from collections import Counter

from attncc.spec import load_spec


class PatternError(ValueError):
    """A pattern file that cannot be imported; the message names the file, line and value."""


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out, start = [], None
    for i, x in enumerate(idx):
        if start is None:
            start = x
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x > start else f"{x}")
            start = None
    return ",".join(out)


def read_duo(folder: str | pathlib.Path) -> tuple[list[list[float]], int, int]:
    """``(gates [layers][kv heads], sink_size, recent_size)`` of a DuoAttention pattern folder."""
    folder = pathlib.Path(folder)
    tsv, cfg = folder / "full_attention_heads.tsv", folder / "config.json"
    for f in (tsv, cfg):
        if not f.is_file():
            raise PatternError(
                f"{f}: not found (a DuoAttention pattern folder holds full_attention_heads.tsv and config.json)"
            )
    gates: list[list[float]] = []
    for n, line in enumerate(tsv.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = [float(x) for x in line.strip().split("\t")]
        except ValueError:
            raise PatternError(f"{tsv}:{n}: expected tab-separated numbers, got {line[:60]!r}") from None
        if any(not math.isfinite(x) for x in row):
            raise PatternError(f"{tsv}:{n}: a gate is not finite")
        gates.append([min(1.0, max(0.0, x)) for x in row])
    if not gates:
        raise PatternError(f"{tsv}: no rows")
    if len({len(r) for r in gates}) != 1:
        raise PatternError(
            f"{tsv}: rows have {sorted({len(r) for r in gates})} columns; every layer needs one gate per kv head"
        )
    try:
        config = json.loads(cfg.read_text())
        sink, recent = config["sink_size"], config["recent_size"]
    except (ValueError, KeyError, TypeError) as e:
        raise PatternError(f"{cfg}: expected a JSON object with integer sink_size and recent_size ({e})") from None
    for key, v in (("sink_size", sink), ("recent_size", recent)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 2**31 - 1:
            raise PatternError(f"{cfg}: {key} must be a non-negative integer, got {v!r}")
    if recent < 1:
        raise PatternError(f"{cfg}: recent_size must be at least 1 (the query itself)")
    return gates, sink, recent


def duo_spec(
    folder: str | pathlib.Path,
    *,
    threshold: float = 0.5,
    sparsity: float | None = None,
    group: int = 1,
    block: int = 64,
) -> str:
    """The spec YAML of a DuoAttention pattern folder (see the module docstring)."""
    gates, sink, recent = read_duo(folder)
    if group < 1:
        raise PatternError(f"--group {group}: query heads per kv head must be at least 1")
    flat = sorted(g for row in gates for g in row)
    how = f"gate >= threshold {threshold}"
    if sparsity is not None:
        if not 0.0 <= sparsity <= 1.0:
            raise PatternError(f"--sparsity {sparsity}: expected a fraction in [0, 1]")
        # DuoAttention's sparsify_attention_heads: the gates at or above the sparsity quantile
        threshold = 2.0 if sparsity >= 1 else -1.0 if sparsity <= 0 else _quantile(flat, sparsity)
        how = f"gate >= the {sparsity} quantile of all gates ({threshold:.6g})"
    full = [[g >= threshold for g in row] for row in gates]
    streaming = (
        {"all": ["causal", {"any": [{"sink": sink}, {"window": recent}]}]}
        if sink
        else {"all": ["causal", {"window": recent}]}
    )
    by_pattern: dict[tuple[bool, ...], list[int]] = {}
    for layer, row in enumerate(full):
        by_pattern.setdefault(tuple(row), []).append(layer)
    name = pathlib.Path(folder).name or "duo"
    lines = [
        f"# imported from DuoAttention pattern {pathlib.Path(folder) / 'full_attention_heads.tsv'}",
        f"# {len(gates)} layers x {len(gates[0])} kv heads; retrieval (full causal) heads: {how};",
        f"# streaming heads: {sink} sink tokens + the {recent} newest (config.json); query heads per kv head: {group}",
        "attncc: 1",
        f"name: {json.dumps('duo-' + name)}",
        f"block_size: {block}",
        "masks:",
        f"  streaming: {json.dumps(streaming)}",
        "rules:",
    ]
    for pattern, layers in by_pattern.items():
        retrieval = [h for h, f in enumerate(pattern) if f]
        lines.append(f"  # rows {_ranges(layers)}: kv heads {_ranges(retrieval) or 'none'} retrieval")
        for layer in layers:
            lines.append(f"  #   layer {layer} gates: " + " ".join(f"{g:.4g}" for g in gates[layer]))
        lines.append(f"  - where: {{layers: {json.dumps(_ranges(layers))}}}")
        if len(retrieval) == len(pattern):
            lines.append("    mask: causal")
            continue
        lines.append("    mask: streaming")
        if retrieval:
            query_heads = [kv * group + g for kv in retrieval for g in range(group)]
            lines.append(f"    heads: {{{json.dumps(_ranges(query_heads))}: causal}}")
    text = "\n".join(lines) + "\n"
    load_spec(text)  # what is printed is a valid spec
    return text


def _quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear) quantile of sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(path: pathlib.Path, what: str):
    if not path.is_file():
        raise PatternError(f"{path}: not found ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PatternError(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg}); expected {what}") from None
    except UnicodeDecodeError:
        raise PatternError(f"{path}: not UTF-8 text; expected {what}") from None


XATTENTION_FORM = (
    "a list with one entry per layer: a threshold in [0, 1] for every head, or a list of them, one per query head"
)


def _python_tables(path: pathlib.Path) -> dict[str, tuple[int, object]]:
    """``name -> (line, value)`` of the literal assignments ``NAME = [...]`` of a Python file."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except SyntaxError as e:
        raise PatternError(f"{path}:{e.lineno}: not Python ({e.msg}); expected NAME = {XATTENTION_FORM}") from None
    tables: dict[str, tuple[int, object]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                tables[node.targets[0].id] = (node.lineno, ast.literal_eval(node.value))
            except ValueError:
                raise PatternError(
                    f"{path}:{node.lineno}: {node.targets[0].id} is not a literal; expected {XATTENTION_FORM}"
                ) from None
    return tables


def read_xattention(
    path: str | pathlib.Path, *, table: str | None = None, stride: int = 16
) -> tuple[list[list[float]], str]:
    """``(thresholds [layers][heads], where)`` of an XAttention threshold file (see the module
    docstring); a layer with one number has one entry (every head)."""
    path = pathlib.Path(path)
    if path.suffix == ".py":
        if not path.is_file():
            raise PatternError(f"{path}: not found (a Python file of threshold tables)")
        tables = _python_tables(path)
        if not tables:
            raise PatternError(f"{path}: no assignments NAME = [...]; expected NAME = {XATTENTION_FORM}")
        name = table or (f"llama_fuse_{stride}" if f"llama_fuse_{stride}" in tables else None)
        if name is None and len(tables) == 1:
            name = next(iter(tables))
        if name is None or name not in tables:
            given = f"--table {table}: no such table" if table else f"--stride {stride}: no llama_fuse_{stride}"
            raise PatternError(f"{path}: {given}; pick one with --table: {', '.join(tables)}")
        line, data = tables[name]
        where = f"{path}:{line}: {name}"
    else:
        if table is not None:
            raise PatternError(f"{path}: --table picks a table of a Python file; a JSON file holds one")
        data = _read_json(path, XATTENTION_FORM)
        where = str(path)
    if not isinstance(data, list) or not data:
        raise PatternError(f"{where}: expected {XATTENTION_FORM}, got {type(data).__name__}")
    rows: list[list[float]] = []
    for layer, entry in enumerate(data):
        values = entry if isinstance(entry, list) else [entry]
        if not values:
            raise PatternError(f"{where}: layer {layer}: an empty list; expected {XATTENTION_FORM}")
        for head, v in enumerate(values):
            at = f"layer {layer}" + (f", head {head}" if isinstance(entry, list) else "")
            if not _is_number(v) or not math.isfinite(v):
                raise PatternError(f"{where}: {at}: {v!r} is not a number; expected {XATTENTION_FORM}")
            if not 0 <= v <= 1:
                raise PatternError(f"{where}: {at}: threshold {v} is outside [0, 1] (a fraction of the attention mass)")
        rows.append([float(v) for v in values])
    return rows, where


def _tau_text(tau: float) -> str:
    return f"{tau:.6g}"


def xattention_spec(path: str | pathlib.Path, *, stride: int = 16, block: int = 128, table: str | None = None) -> str:
    """The spec YAML of an XAttention threshold file (see the module docstring), for a decoder
    (XAttention's language-model path, ``causal=True``)."""
    if stride < 1 or block % stride:
        raise PatternError(f"--stride {stride}: must divide the block size {block}")
    rows, where = read_xattention(path, table=table, stride=stride)
    taus = sorted({t for row in rows for t in row})
    names: dict[float, str] = {}
    for i, t in enumerate(taus):
        name = "tau_" + _tau_text(t).replace(".", "_").replace("-", "m").replace("+", "")
        names[t] = name if name not in names.values() else f"{name}_{i}"
    static = [{"sink": block}, {"chunk": block}]

    def mask_of(tau: float) -> dict:
        selector = {"threshold": {"tau": tau, "score": "antidiagonal", "stride": stride, "block": block}}
        kept = static if tau == 0 else [*static, selector]
        return {"all": ["causal", {"any": kept}]}

    lines = [
        f"# imported from XAttention thresholds {where}",
        f"# {len(rows)} layers; stride {stride}, {block}-token blocks; every head keeps XAttention's always-kept",
        "# blocks (the first kv block and the diagonal block) and the fewest other blocks holding tau of the mass.",
        "# Where attncc differs: XAttention's block score sums the softmax of each stride-row over all keys and",
        "# counts the always-kept blocks towards tau; attncc's threshold ranks blocks by the logsumexp of their",
        "# antidiagonal scores and takes tau of the other (candidate) blocks' softmax mass. XAttention runs",
        "# only at prefill (decode steps attend densely); attncc applies the rule at every call.",
        "attncc: 1",
        f"name: {json.dumps('xattention-' + pathlib.Path(path).stem)}",
        f"block_size: {block}",
        "masks:",
    ]
    for tau in taus:
        how = "first and diagonal block only" if tau == 0 else f"tau {_tau_text(tau)}"
        lines.append(f"  # {how}")
        lines.append(f"  {names[tau]}: {json.dumps(mask_of(tau))}")
    lines.append("rules:")
    by_pattern: dict[tuple[float, ...], list[int]] = {}
    for layer, row in enumerate(rows):
        by_pattern.setdefault(tuple(row), []).append(layer)
    for pattern, layers in by_pattern.items():
        common = Counter(pattern).most_common(1)[0][0] if len(pattern) > 1 else pattern[0]
        lines.append(f"  # layers {_ranges(layers)}: " + _head_summary(pattern, lambda t: f"tau {_tau_text(t)}"))
        if len(pattern) > 1 and len(set(pattern)) > 1:
            for layer in layers:
                lines.append(f"  #   layer {layer} thresholds: " + " ".join(_tau_text(t) for t in rows[layer]))
        lines.append(f"  - where: {{layers: {json.dumps(_ranges(layers))}}}")
        lines.append(f"    mask: {names[common]}")
        others = {t: [h for h, x in enumerate(pattern) if x == t] for t in dict.fromkeys(pattern) if t != common}
        if others:
            body = ", ".join(f"{json.dumps(_ranges(hs))}: {names[t]}" for t, hs in others.items())
            lines.append(f"    heads: {{{body}}}")
    text = "\n".join(lines) + "\n"
    load_spec(text)  # what is printed is a valid spec
    return text


def _head_summary(pattern: tuple, show) -> str:
    if len(pattern) == 1:
        return f"every head {show(pattern[0])}"
    groups: dict = {}
    for h, x in enumerate(pattern):
        groups.setdefault(x, []).append(h)
    return "; ".join(f"heads {_ranges(hs)} {show(x)}" for x, hs in groups.items())


MINFERENCE_TYPES = ("stream_llm", "a_shape", "vertical_and_slash", "block_sparse")
MINFERENCE_FORM = (
    "a list with one object per layer mapping a head index (a string) to [type, vertical_size, slash_size, score], "
    f"type one of {', '.join(MINFERENCE_TYPES)}"
)
#: what MInference runs for a head its file does not list
MINFERENCE_DEFAULT = ("vertical_and_slash", 1000, 6096)
#: MInference's block_sparse_kernel: top_k blocks of block_size_N tokens, whatever the file says
MINFERENCE_BLOCK_TOPK, MINFERENCE_BLOCK = 100, 64


def read_minference(path: str | pathlib.Path) -> list[dict[int, tuple[str, int, int]]]:
    """Per layer, ``head -> (type, vertical_size, slash_size)`` of a MInference best-pattern file."""
    path = pathlib.Path(path)
    data = _read_json(path, MINFERENCE_FORM)
    if not isinstance(data, list) or not data:
        raise PatternError(f"{path}: expected {MINFERENCE_FORM}, got {type(data).__name__}")
    layers: list[dict[int, tuple[str, int, int]]] = []
    for layer, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise PatternError(f"{path}: layer {layer}: a {type(entry).__name__}; expected {MINFERENCE_FORM}")
        heads: dict[int, tuple[str, int, int]] = {}
        for key, value in entry.items():
            at = f"{path}: layer {layer}, head {json.dumps(key)}"
            if not key.isdigit() or len(key) > 4 or int(key) >= 4096:
                raise PatternError(f"{at}: a head index is a non-negative integer below 4096 written as a string")
            if not isinstance(value, list) or len(value) != 4:
                raise PatternError(f"{at}: expected [type, vertical_size, slash_size, score], got {value!r}")
            ty, v, s, _score = value
            if ty not in MINFERENCE_TYPES:
                raise PatternError(f"{at}: unknown pattern type {ty!r}; expected one of {', '.join(MINFERENCE_TYPES)}")
            for what, x in (("vertical_size", v), ("slash_size", s)):
                if not _is_int(x) or not 0 <= x <= 2**31 - 1:
                    raise PatternError(f"{at}: {what} must be a non-negative integer, got {x!r}")
            if ty in ("stream_llm", "a_shape") and s < 1:
                raise PatternError(f"{at}: {ty} slash_size (the local window, n_local) must be at least 1")
            heads[int(key)] = ("stream_llm" if ty == "a_shape" else ty, v, s)
        layers.append(heads)
    return layers


def _minference_mask(pattern: tuple[str, int, int], block: int) -> tuple[str, dict, str]:
    """``(name, mask, comment)`` of one MInference head pattern."""
    ty, v, s = pattern
    if ty == "stream_llm":
        local = {"any": [{"sink": v}, {"window": s}]} if v else {"window": s}
        return (
            f"stream_{v}_{s}",
            {"all": ["causal", local]},
            f"stream_llm {v} / {s}: the {v} first tokens (n_init) and the {s} newest (n_local), causally",
        )
    if ty == "vertical_and_slash":
        vv, ss = max(v, 30), max(s, 50)
        note = "" if (vv, ss) == (v, s) else f" (the file's {v} / {s} clamped as MInference does)"
        return (
            f"vs_{v}_{s}",
            {"all": ["causal", {"vertical_slash": {"vertical": vv, "slash": ss, "block": block}}]},
            f"vertical_and_slash {v} / {s}: the {vv} top key columns and {ss} top diagonals of the last 64 "
            f"queries{note}, as {block}-token blocks",
        )
    topk = {"k": MINFERENCE_BLOCK_TOPK, "score": "mean_pool", "block": MINFERENCE_BLOCK}
    return (
        "block_sparse",
        {"all": ["causal", {"topk": topk}]},
        f"block_sparse: the {MINFERENCE_BLOCK_TOPK} kv blocks of {MINFERENCE_BLOCK} tokens with the highest "
        f"mean-pooled q . k per query block (MInference's top_k, whatever the file's {v} / {s}; attncc "
        "averages a last partial block over its tokens, MInference over 64 with zero padding)",
    )


def minference_spec(path: str | pathlib.Path, *, block: int = 64) -> str:
    """The spec YAML of a MInference best-pattern file (see the module docstring)."""
    if block % 16 or block & (block - 1) or not 16 <= block <= MINFERENCE_BLOCK:
        raise PatternError(
            f"--block {block}: a power of two from 16 to {MINFERENCE_BLOCK} (MInference's blocks are 64 tokens)"
        )
    layers = read_minference(path)
    nheads = [max(h, default=-1) + 1 for h in layers]
    patterns = [tuple(layer.get(h, MINFERENCE_DEFAULT) for h in range(n)) for layer, n in zip(layers, nheads)]
    named: dict[tuple[str, int, int], tuple[str, dict, str]] = {}
    for p in [MINFERENCE_DEFAULT, *dict.fromkeys(x for row in patterns for x in row)]:
        named.setdefault(p, _minference_mask(p, block))
    lines = [
        f"# imported from MInference best-pattern file {pathlib.Path(path)}",
        f"# {len(layers)} layers; query heads map to their own patterns (MInference repeats the kv heads).",
        "# Where attncc differs: a vertical_and_slash head keeps every pair of each block pair holding a kept",
        "# column or diagonal (MInference: those tokens only); MInference scales the estimate by head_dim ** -0.5",
        "# (attncc: the model's scale) and runs its patterns only at prefill (decode steps attend densely);",
        "# attncc applies the rule at every call.",
        "attncc: 1",
        f"name: {json.dumps('minference-' + pathlib.Path(path).stem)}",
        f"block_size: {block}",
        "masks:",
    ]
    for name, mask, comment in named.values():
        lines.append(f"  # {comment}")
        lines.append(f"  {name}: {json.dumps(mask)}")
    lines.append("rules:")
    by_pattern: dict[tuple, list[int]] = {}
    for layer, row in enumerate(patterns):
        by_pattern.setdefault(row, []).append(layer)
    default_name = named[MINFERENCE_DEFAULT][0]
    for row, rule_layers in by_pattern.items():
        listed = [h for h in range(len(row)) if all(h in layers[i] for i in rule_layers)]
        missing = [h for h in range(len(row)) if h not in listed]
        summary = _head_summary(row, lambda p: named[p][0]) if row else "no heads listed"
        lines.append(f"  # layers {_ranges(rule_layers)}: {summary}")
        if missing:
            lines.append(f"  #   heads {_ranges(missing)} are not in the file: MInference's default {default_name}")
        lines.append(f"  #   heads past {len(row) - 1} (not in the file): MInference's default, the rule's mask")
        lines.append(f"  - where: {{layers: {json.dumps(_ranges(rule_layers))}}}")
        lines.append(f"    mask: {default_name}")
        others: dict[tuple, list[int]] = {}
        for h, p in enumerate(row):
            if p != MINFERENCE_DEFAULT:
                others.setdefault(p, []).append(h)
        if others:
            body = ", ".join(f"{json.dumps(_ranges(hs))}: {named[p][0]}" for p, hs in others.items())
            lines.append(f"    heads: {{{body}}}")
    text = "\n".join(lines) + "\n"
    load_spec(text)  # what is printed is a valid spec
    return text
