"""The mask node contract, the registry of primitives, and the helpers primitives share.

Every mask node has three faces that must agree exactly:

* ``dense(h, q, kv)``: the reference, a bool tensor broadcast from integer
  position tensors (the ground truth every kernel is tested against);
* ``bounds(qb, kb)``: conservative block bounds, ``(may, must)`` bool tensors
  over block pairs: ``may`` False proves no pair in the block is allowed,
  ``must`` True proves every pair is allowed (closed form, no S x S). They only
  read ``lo``/``hi`` (attained min/max positions), ``box`` and ``length``, so
  they hold for any token set so summarised (a block, a group of blocks, a
  permuted tile); ``tight`` says when they are exact (see :class:`Mask`);
* ``triton()``: a Triton expression over ``q_pos`` ``[BM, 1]``, ``kv_pos``
  ``[1, BN]`` (int64 token positions in model order, never negative), ``off_h``
  (the query head) and ``KV_LEN``; it broadcasts to ``[BM, BN]`` (it may be
  narrower, e.g. ``[1, BN]`` for ``sink``). Helpers it calls are returned by
  ``triton_helpers()`` and emitted once per kernel module.

A primitive registers itself with :func:`register`: its spec key, its parser and the JSON
schema of its argument live in its own file, and the parser table, the schema and the
docs' list of primitives are built from :data:`PRIMITIVES`.

Positions are always the model's token order; permutations only change which
tokens share a block (see :mod:`attncc.ir.blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Tensor = torch.Tensor
Path = tuple[str | int, ...]


class MaskError(ValueError):
    """A mask node is malformed; ``path`` is the key path inside the node."""

    def __init__(self, message: str, path: Path = ()):
        super().__init__(message)
        self.message = message
        self.path = path


@dataclass(frozen=True)
class Blocks:
    """Position summaries of token blocks, broadcastable as rows or columns.

    ``lo``/``hi`` are the min/max original positions in each block (inclusive);
    ``pos`` is ``[nblocks, B]`` original positions, -1 past the sequence end.
    ``boxes`` optionally holds precomputed ``(grid, box(grid))`` entries shaped like
    ``lo`` (the block classifier summarises groups of blocks this way, without ``pos``).
    """

    lo: Tensor
    hi: Tensor
    pos: Tensor
    length: int
    boxes: tuple[tuple[tuple[int, int, int], tuple[Tensor, ...]], ...] = ()

    def box(self, grid: tuple[int, int, int]) -> tuple[Tensor, ...]:
        """Per-block (t_lo, t_hi, h_lo, h_hi, w_lo, w_hi) over a row-major T x H x W grid."""
        for g, box in self.boxes:
            if g == grid:
                return box
        _, gh, gw = grid
        valid = self.pos >= 0
        p = self.pos.clamp(min=0)
        coords = (p // (gh * gw), (p // gw) % gh, p % gw)
        big = torch.iinfo(torch.int64).max
        out = []
        for c in coords:
            out.append(torch.where(valid, c, big).amin(-1))
            out.append(torch.where(valid, c, -1).amax(-1))
        return tuple(out)

    def view(self, rows: bool) -> Blocks:
        shape = (-1, 1) if rows else (1, -1)
        boxes = tuple((g, tuple(t.reshape(shape) for t in box)) for g, box in self.boxes)
        return Blocks(self.lo.view(shape), self.hi.view(shape), self.pos, self.length, boxes)


class Mask:
    """Base of all mask nodes (frozen dataclasses)."""

    kind: ClassVar[str] = ""
    #: True when the predicate reads data at run time (block selectors).
    dynamic: ClassVar[bool] = False
    #: True when the predicate depends on the head index.
    uses_head: ClassVar[bool] = False
    #: True when the predicate reads the sequence lengths (``KV_LEN``), not only positions.
    uses_lengths: ClassVar[bool] = False
    #: When ``bounds`` is exact, i.e. ``may`` True proves some pair is allowed and ``must``
    #: False proves some pair is not: "always" (for any token sets: the bounds read attained
    #: positions only), "contiguous" (when both token sets are runs of consecutive positions),
    #: "box" (when both sets fill their boxes on :meth:`box_grid`) or "" (never).
    tight: ClassVar[str] = ""
    #: True when the predicate reads only d = q - kv (composites: when all children do).
    distance_only: ClassVar[bool] = False
    #: False when the predicate never reads the query position (``full``, ``sink``): it means the
    #: same wherever the queries sit, so it applies even where their positions are unknown.
    query_free: ClassVar[bool] = False

    def dense(self, h: Tensor, q: Tensor, kv: Tensor, q_len: int, kv_len: int) -> Tensor:
        raise NotImplementedError

    def bounds(self, qb: Blocks, kb: Blocks, h: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def triton(self) -> str:
        raise NotImplementedError

    def to_spec(self) -> Any:
        raise NotImplementedError

    def children(self) -> tuple[Mask, ...]:
        return ()

    def walk(self) -> Iterator[Mask]:
        yield self
        for c in self.children():
            yield from c.walk()

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise MaskError when the mask cannot apply to these lengths (a grid that holds a
        different number of tokens); composites check every child."""
        for c in self.children():
            c.check_lengths(q_len, kv_len)

    def box_grid(self) -> tuple[int, int, int] | None:
        """The T x H x W grid whose boxes ``bounds`` reads (``tight == "box"``), else None."""
        return None

    def count_box_pairs(self, qbox: list[Tensor], kbox: list[Tensor]) -> int | None:
        """Allowed pairs summed over block pairs whose tokens fill their grid boxes (``qbox`` /
        ``kbox``: the six box tensors of each pair), in closed form; None when not known."""
        return None

    def triton_helpers(self) -> tuple[str, ...]:
        """Sources of ``@triton.jit`` helpers this node's ``triton()`` expression calls."""
        return ()

    @property
    def is_dynamic(self) -> bool:
        return any(m.dynamic for m in self.walk())

    @property
    def depends_on_head(self) -> bool:
        return any(m.uses_head for m in self.walk())

    @property
    def reads_lengths(self) -> bool:
        return any(m.uses_lengths for m in self.walk())

    @property
    def reads_query(self) -> bool:
        """True when the predicate depends on the query position somewhere (see ``query_free``)."""
        return not all(m.query_free or m.children() for m in self.walk())

    @property
    def reads_distance_only(self) -> bool:
        """True when the whole predicate is a function of q - kv alone."""
        return all(m.distance_only for m in self.walk())

    @property
    def name(self) -> str:
        """A short identifier usable in kernel names."""
        return self.kind

    def __str__(self) -> str:
        return format_spec(self.to_spec())


def format_spec(obj: Any) -> str:
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {format_spec(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(format_spec(v) for v in obj) + "]"
    return str(obj)


# -- the registry ---------------------------------------------------------------------------------
#: parses a child mask node at a key path (composites call it for their items)
ChildParser = Callable[[Any, Path], Mask]
Parser = Callable[[Any, Path, ChildParser], Mask]


@dataclass(frozen=True)
class Primitive:
    """A spec key and what it means: ``parse(arg, path, child)`` builds the mask from the
    key's argument; ``schema`` is the JSON schema of that argument (None for a primitive
    spelled as a bare name, such as ``causal``); ``description`` is its predicate in words."""

    key: str
    parse: Parser
    schema: dict | None
    description: str

    @property
    def bare(self) -> bool:
        return self.schema is None


#: every mask primitive by spec key, in the order the docs and the schema list them
PRIMITIVES: dict[str, Primitive] = {}


def register(key: str, description: str, schema: dict | None = None, parse: Parser | None = None):
    """Class decorator: register the decorated mask class under spec ``key``. Without ``parse``,
    the class's own ``parse`` classmethod is used (bare primitives take no argument)."""

    def add(cls):
        parser = parse if parse is not None else getattr(cls, "parse", None)
        if parser is None:
            if schema is not None:
                raise TypeError(f"mask primitive '{key}' takes an argument but has no parser")

            def parser(arg: Any, path: Path, child: ChildParser, cls=cls) -> Mask:
                return cls()

        if key in PRIMITIVES:
            raise ValueError(f"mask primitive '{key}' registered twice")
        PRIMITIVES[key] = Primitive(key, parser, schema, description)
        return cls

    return add


# -- helpers for dense / bounds ---------------------------------------------------------------------
def broadcast_shape(*shapes: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """NumPy broadcasting of shapes (``torch.broadcast_shapes`` imports sympy on first use,
    which costs seconds)."""
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, n in enumerate(shape, ndim - len(shape)):
            if n != 1:
                if out[i] not in (1, n):
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = n
    return tuple(out)


def on_grid(h: Tensor, q: Tensor, kv: Tensor, value: Tensor | bool) -> Tensor:
    """``value`` (a predicate of some of h, q, kv, or a constant) broadcast to the full
    (h, q, kv) shape, so every ``dense`` returns the same shape whatever it reads."""
    shape = broadcast_shape(h.shape, q.shape, kv.shape)
    if isinstance(value, bool):
        return torch.full(shape, value, dtype=torch.bool, device=q.device)
    return value.expand(shape)


def on_pairs(qb: Blocks, kb: Blocks, value: Tensor | bool) -> Tensor:
    """``value`` (a predicate of query blocks or kv blocks alone, or a constant) broadcast to
    the (query block, kv block) pair shape that ``bounds`` returns."""
    shape = broadcast_shape(qb.lo.shape, kb.lo.shape)
    if isinstance(value, bool):
        return torch.full(shape, value, dtype=torch.bool, device=qb.lo.device)
    return value.expand(shape)


def dist_bounds(qb: Blocks, kb: Blocks) -> tuple[Tensor, Tensor]:
    """Range [dmin, dmax] of d = q - kv over a block pair (every integer inside is reachable
    for contiguous blocks; a superset otherwise, which keeps the bounds conservative)."""
    return qb.lo - kb.hi, qb.hi - kb.lo


def in_range(dmin: Tensor, dmax: Tensor, lo: int | None, hi: int | None) -> tuple[Tensor, Tensor]:
    """(may, must) for the predicate lo <= d <= hi over d in [dmin, dmax] (None: unbounded)."""
    may, must = dmin <= dmax, dmin <= dmax
    if lo is not None:
        may, must = may & (dmax >= lo), must & (dmin >= lo)
    if hi is not None:
        may, must = may & (dmin <= hi), must & (dmax <= hi)
    return may, must


def grid_coords(p: Tensor, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """(t, h, w) coordinates of row-major positions ``p`` on a T x H x W grid."""
    _, gh, gw = grid
    return p // (gh * gw), (p // gw) % gh, p % gw


def triton_grid_coords(pos: str, grid: tuple[int, int, int]) -> tuple[str, str, str]:
    """The Triton expressions of :func:`grid_coords` for the position expression ``pos``."""
    _, gh, gw = grid
    return f"({pos} // {gh * gw})", f"(({pos} // {gw}) % {gh})", f"({pos} % {gw})"


def check_grid_length(kind: str, grid: tuple[int, int, int], n: int, what: str) -> None:
    total = grid[0] * grid[1] * grid[2]
    if n != total:
        raise MaskError(f"{kind} grid {list(grid)} holds {total} tokens but the {what} length is {n}")


def dense(
    mask: Mask,
    q_len: int,
    kv_len: int,
    num_heads: int = 1,
    heads: list[int] | None = None,
    q_offset: int = 0,
    device=None,
) -> Tensor:
    """Dense bool mask ``[H, q_len, kv_len]`` (model token order)."""
    hs = torch.tensor(heads if heads is not None else list(range(num_heads)), device=device).view(-1, 1, 1)
    q = torch.arange(q_len, device=device).view(1, -1, 1) + q_offset
    kv = torch.arange(kv_len, device=device).view(1, 1, -1)
    out = mask.dense(hs, q, kv, q_len, kv_len)
    return out.expand(hs.shape[0], q_len, kv_len).clone()
