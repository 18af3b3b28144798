"""Where a site's queries sit among its keys, read from the graph (spec positions are the model's
absolute positions: key j is at j, and a query is where the model's cache puts it).

* keys appended to a cache, ``cat([past, new])`` along the sequence with ``new`` as long as the
  queries: the queries are the last keys (``end``, bottom-right: query i at ``kv_len - q_len + i``,
  as FlashAttention >= 2.1 and Hugging Face's dynamic cache);
* keys written into a cache, ``cache.index_copy_(seq, positions, new)``: the queries are at
  ``positions`` (``given``: a static cache's ``cache_position``, read at run time);
* as many queries as keys, provably for every shape the graph sees: query i at key i (``start``);
* otherwise ``unknown`` (cross-attention has no query positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attncc.passes.graph import arg, maybe_tensor
from attncc.passes.spelling import kind

Kind = Literal["start", "end", "given", "unknown"]


@dataclass(frozen=True)
class QueryPositions:
    """``kind`` (see the module docstring); ``node``: the positions tensor of ``given``; ``why``:
    how they were established, for the logs and the manifest."""

    kind: Kind
    why: str
    node: fx.Node | None = None


def same_size(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    """Whether two sizes are equal for every shape the graph will see (no guard is installed)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(statically_known_true(a == b))
    return a == b


def _norm(dim: object, ndim: int) -> int | None:
    if not isinstance(dim, int):
        return None
    return dim + ndim if dim < 0 else dim


def _appended(keys: fx.Node, seq_dim: int, q_len: int | torch.SymInt) -> bool:
    """``keys`` is ``cat([..., new])`` along ``seq_dim`` with ``new`` as long as the queries."""
    if kind(keys) != "cat":
        return False
    parts = arg(keys, 0, "tensors")
    out = maybe_tensor(keys)
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or out is None:
        return False
    if _norm(arg(keys, 1, "dim", 0), out.dim()) != seq_dim:
        return False
    new = maybe_tensor(parts[-1])
    return new is not None and new.dim() == out.dim() and same_size(new.shape[seq_dim], q_len)


def _written(keys: fx.Node, seq_dim: int, q_len: int | torch.SymInt, site: fx.Node) -> fx.Node | None:
    """The positions tensor of the last ``keys.index_copy_(seq_dim, positions, new)`` (``new`` as
    long as the queries) before ``site``, when ``keys`` is a cache written that way (or the copy's
    result); else None."""
    order = {n: i for i, n in enumerate(site.graph.nodes)}
    candidates = [keys] if kind(keys) == "index_copy" else []
    candidates += [u for u in keys.users if kind(u) == "index_copy" and u.args and u.args[0] is keys]
    found: tuple[int, fx.Node] | None = None
    for node in candidates:
        if order.get(node, len(order)) >= order[site] or len(node.args) < 4:
            continue
        cache, dim, positions, new = node.args[:4]
        cache_val, new_val = maybe_tensor(cache), maybe_tensor(new)
        if cache_val is None or new_val is None or not isinstance(positions, fx.Node):
            continue
        if _norm(dim, cache_val.dim()) == seq_dim and same_size(new_val.shape[seq_dim], q_len):
            if found is None or order[node] > found[0]:
                found = (order[node], positions)
    return found[1] if found is not None else None


def query_positions(
    keys: fx.Node, seq_dim: int, q_len: int | torch.SymInt, kv_len: int | torch.SymInt, site: fx.Node
) -> QueryPositions:
    """Where the queries of ``site`` sit among its keys ``keys`` (sequence along ``seq_dim``)."""
    if _appended(keys, seq_dim, q_len):
        return QueryPositions("end", f"keys {keys.name} are a cache the queries' keys were appended to")
    positions = _written(keys, seq_dim, q_len, site)
    if positions is not None:
        return QueryPositions("given", f"keys {keys.name} are a cache written at {positions.name}", positions)
    if same_size(q_len, kv_len):
        return QueryPositions("start", "as many queries as keys: query i is at key i")
    return QueryPositions(
        "unknown", f"{q_len} queries over {kv_len} keys that are not a cache of them (cross-attention?)"
    )
