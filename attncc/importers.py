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
"""

from __future__ import annotations

import json
import math
import pathlib

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
