"""Mask algebra: predicates of (head, q, kv) over token positions.

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
  narrower, e.g. ``[1, BN]`` for ``sink``). ``random_blocks`` also calls
  ``_rb_hash``, defined by :data:`TRITON_HELPERS`.

Positions are always the model's token order; permutations only change which
tokens share a block (see :mod:`attncc.blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Tensor = torch.Tensor


class MaskError(ValueError):
    """A mask node is malformed; ``path`` is the key path inside the node."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()):
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
    #: When ``bounds`` is exact, i.e. ``may`` True proves some pair is allowed and ``must``
    #: False proves some pair is not: "always" (for any token sets: the bounds read attained
    #: positions only), "contiguous" (when both token sets are runs of consecutive positions),
    #: "box" (when both sets fill their grid boxes, see Tile3D) or "" (never).
    tight: ClassVar[str] = ""
    #: True when the predicate reads only d = q - kv (composites: when all children do).
    distance_only: ClassVar[bool] = False

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

    def walk(self):
        yield self
        for c in self.children():
            yield from c.walk()

    @property
    def is_dynamic(self) -> bool:
        return any(m.dynamic for m in self.walk())

    @property
    def depends_on_head(self) -> bool:
        return any(m.uses_head for m in self.walk())

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


def _on_grid(h: Tensor, q: Tensor, kv: Tensor, value: Tensor | bool) -> Tensor:
    """``value`` (a predicate of some of h, q, kv, or a constant) broadcast to the full
    (h, q, kv) shape, so every ``dense`` returns the same shape whatever it reads."""
    shape = broadcast_shape(h.shape, q.shape, kv.shape)
    if isinstance(value, bool):
        return torch.full(shape, value, dtype=torch.bool, device=q.device)
    return value.expand(shape)


def _on_pairs(qb: Blocks, kb: Blocks, value: Tensor | bool) -> Tensor:
    """``value`` (a predicate of query blocks or kv blocks alone, or a constant) broadcast to
    the (query block, kv block) pair shape that ``bounds`` returns."""
    shape = broadcast_shape(qb.lo.shape, kb.lo.shape)
    if isinstance(value, bool):
        return torch.full(shape, value, dtype=torch.bool, device=qb.lo.device)
    return value.expand(shape)


def _largest_pow2_at_most(x: Tensor) -> Tensor:
    """Largest power of two <= x for int64 x >= 1 (0 where x < 1), in exact integer arithmetic."""
    y = x.clamp(min=0)
    for shift in (1, 2, 4, 8, 16, 32):
        y = y | (y >> shift)
    return y - (y >> 1)


def _dist_bounds(qb: Blocks, kb: Blocks) -> tuple[Tensor, Tensor]:
    """Range [dmin, dmax] of d = q - kv over a block pair (every integer inside is reachable
    for contiguous blocks; a superset otherwise, which keeps the bounds conservative)."""
    return qb.lo - kb.hi, qb.hi - kb.lo


def _in_range(dmin: Tensor, dmax: Tensor, lo: int | None, hi: int | None) -> tuple[Tensor, Tensor]:
    """(may, must) for the predicate lo <= d <= hi over d in [dmin, dmax] (None: unbounded)."""
    may, must = dmin <= dmax, dmin <= dmax
    if lo is not None:
        may, must = may & (dmax >= lo), must & (dmin >= lo)
    if hi is not None:
        may, must = may & (dmin <= hi), must & (dmax <= hi)
    return may, must


@dataclass(frozen=True)
class Full(Mask):
    """Every pair: true."""

    kind: ClassVar[str] = "full"
    tight: ClassVar[str] = "always"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        return _on_grid(h, q, kv, True)

    def bounds(self, qb, kb, h):
        t = _on_pairs(qb, kb, True)
        return t, t

    def triton(self):
        return "((q_pos >= 0) & (kv_pos >= 0))"

    def to_spec(self):
        return "full"


@dataclass(frozen=True)
class Causal(Mask):
    """kv <= q."""

    kind: ClassVar[str] = "causal"
    tight: ClassVar[str] = "always"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        return _on_grid(h, q, kv, kv <= q)

    def bounds(self, qb, kb, h):
        dmin, dmax = _dist_bounds(qb, kb)
        return _in_range(dmin, dmax, 0, None)

    def triton(self):
        return "(kv_pos <= q_pos)"

    def to_spec(self):
        return "causal"


@dataclass(frozen=True)
class Window(Mask):
    """q - before <= kv <= q + after. ``{window: N}`` is before=N-1, after=0."""

    before: int
    after: int
    kind: ClassVar[str] = "window"
    tight: ClassVar[str] = "contiguous"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        d = q - kv
        return _on_grid(h, q, kv, (d <= self.before) & (d >= -self.after))

    def bounds(self, qb, kb, h):
        dmin, dmax = _dist_bounds(qb, kb)
        return _in_range(dmin, dmax, -self.after, self.before)

    def triton(self):
        return f"(((q_pos - kv_pos) <= {self.before}) & ((kv_pos - q_pos) <= {self.after}))"

    def to_spec(self):
        if self.after == 0:
            return {"window": self.before + 1}
        return {"window": {"before": self.before, "after": self.after}}

    @property
    def name(self):
        return f"window{self.before + 1}" if self.after == 0 else f"window{self.before}_{self.after}"


@dataclass(frozen=True)
class Sink(Mask):
    """kv < n."""

    n: int
    kind: ClassVar[str] = "sink"
    tight: ClassVar[str] = "always"

    def dense(self, h, q, kv, q_len, kv_len):
        return _on_grid(h, q, kv, kv < self.n)

    def bounds(self, qb, kb, h):
        return _on_pairs(qb, kb, kb.lo < self.n), _on_pairs(qb, kb, kb.hi < self.n)

    def triton(self):
        return f"(kv_pos < {self.n})"

    def to_spec(self):
        return {"sink": self.n}

    @property
    def name(self):
        return f"sink{self.n}"


@dataclass(frozen=True)
class Prefix(Sink):
    """kv < n: a bidirectional prefix (compose with causal for prefix-LM)."""

    kind: ClassVar[str] = "prefix"

    def to_spec(self):
        return {"prefix": self.n}

    @property
    def name(self):
        return f"prefix{self.n}"


@dataclass(frozen=True)
class Global(Mask):
    """q < n or kv < n."""

    n: int
    kind: ClassVar[str] = "global"
    tight: ClassVar[str] = "always"

    def dense(self, h, q, kv, q_len, kv_len):
        return _on_grid(h, q, kv, (q < self.n) | (kv < self.n))

    def bounds(self, qb, kb, h):
        return (qb.lo < self.n) | (kb.lo < self.n), (qb.hi < self.n) | (kb.hi < self.n)

    def triton(self):
        return f"((q_pos < {self.n}) | (kv_pos < {self.n}))"

    def to_spec(self):
        return {"global": self.n}

    @property
    def name(self):
        return f"global{self.n}"


@dataclass(frozen=True)
class Chunk(Mask):
    """q // size == kv // size."""

    size: int
    kind: ClassVar[str] = "chunk"
    tight: ClassVar[str] = "contiguous"

    def dense(self, h, q, kv, q_len, kv_len):
        return _on_grid(h, q, kv, q // self.size == kv // self.size)

    def bounds(self, qb, kb, h):
        s = self.size
        qlo, qhi, klo, khi = qb.lo // s, qb.hi // s, kb.lo // s, kb.hi // s
        may = (qlo <= khi) & (klo <= qhi)
        must = (qlo == qhi) & (klo == khi) & (qlo == klo)
        return may, must

    def triton(self):
        return f"((q_pos // {self.size}) == (kv_pos // {self.size}))"

    def to_spec(self):
        return {"chunk": self.size}

    @property
    def name(self):
        return f"chunk{self.size}"


@dataclass(frozen=True)
class BlockCausal(Mask):
    """kv // size <= q // size."""

    size: int
    kind: ClassVar[str] = "block_causal"
    tight: ClassVar[str] = "always"

    def dense(self, h, q, kv, q_len, kv_len):
        return _on_grid(h, q, kv, kv // self.size <= q // self.size)

    def bounds(self, qb, kb, h):
        s = self.size
        return kb.lo // s <= qb.hi // s, kb.hi // s <= qb.lo // s

    def triton(self):
        return f"((kv_pos // {self.size}) <= (q_pos // {self.size}))"

    def to_spec(self):
        return {"block_causal": self.size}

    @property
    def name(self):
        return f"blockcausal{self.size}"


@dataclass(frozen=True)
class Strided(Mask):
    """(q - kv) % stride == 0 (both directions; compose with causal for the past only)."""

    stride: int
    kind: ClassVar[str] = "strided"
    tight: ClassVar[str] = "contiguous"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        return _on_grid(h, q, kv, (q - kv) % self.stride == 0)

    def bounds(self, qb, kb, h):
        s = self.stride
        dmin, dmax = _dist_bounds(qb, kb)
        # a multiple of s lies in [dmin, dmax] iff floor(dmax / s) * s >= dmin
        may = torch.div(dmax, s, rounding_mode="floor") * s >= dmin
        must = (dmin == dmax) & (dmin % s == 0) if s > 1 else may
        return may, must

    def triton(self):
        # Triton's % follows C (sign of the dividend); take |q - kv| first.
        return f"((tl.abs(q_pos - kv_pos) % {self.stride}) == 0)"

    def to_spec(self):
        return {"strided": self.stride}

    @property
    def name(self):
        return f"strided{self.stride}"


@dataclass(frozen=True)
class Power(Mask):
    """PowerAttention-style causal power-of-two distances: with d = q - kv,
    ``0 <= d < local`` or ``d`` is a power of two (1, 2, 4, 8, ...).

    ``{power: 1}`` is the pure pattern (the query itself plus keys 1, 2, 4, ... back);
    a larger ``local`` adds a dense causal window of ``local`` tokens."""

    local: int
    kind: ClassVar[str] = "power"
    distance_only: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        d = q - kv
        pow2 = (d > 0) & ((d & (d - 1)) == 0)
        return _on_grid(h, q, kv, (d >= 0) & ((d < self.local) | pow2))

    def bounds(self, qb, kb, h):
        dmin, dmax = _dist_bounds(qb, kb)
        # some d in [max(dmin, 0), dmax] is < local, or the largest power of two <= dmax is in range
        lo = dmin.clamp(min=0)
        top = _largest_pow2_at_most(dmax)
        may = (dmax >= 0) & ((lo < self.local) | ((top >= lo) & (top >= 1)))
        must = (dmin >= 0) & (dmax < self.local)
        return may, must

    def triton(self):
        d = "(q_pos - kv_pos)"
        return f"(({d} >= 0) & (({d} < {self.local}) | (({d} > 0) & (({d} & ({d} - 1)) == 0))))"

    def to_spec(self):
        return {"power": self.local}

    @property
    def name(self):
        return f"power{self.local}"


_HASH_MUL = 1274126177


def random_block_hash(seed: int, head, qblock, j: int):
    """The 31-bit hash behind ``random_blocks``; works on ints and int64 tensors alike
    and is emitted identically in Triton (all intermediate values stay below 2**63)."""
    x = (seed * 1000003 + head * 7919 + qblock * 104729 + j * 15485863) & 0x7FFFFFFF
    x = x ^ (x >> 13)
    x = (x * _HASH_MUL) & 0x7FFFFFFF
    return x ^ (x >> 16)


@dataclass(frozen=True)
class RandomBlocks(Mask):
    """BigBird-style random blocks: with B = block, query block qb = q // B sees kv block
    (random_block_hash(seed, head, qb, j) % ceil(kv_len / B)) for j < n (up to n distinct)."""

    n: int
    seed: int
    block: int = 64
    kind: ClassVar[str] = "random_blocks"
    uses_head: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        nkb = -(-kv_len // self.block)
        qblk, kblk = q // self.block, kv // self.block
        out = _on_grid(h, q, kv, False).clone()
        for j in range(self.n):
            out |= kblk == random_block_hash(self.seed, h, qblk, j) % nkb
        return out

    def bounds(self, qb, kb, h):
        # exact when blocks align with ``block``; conservative otherwise (refined later)
        b = self.block
        aligned_q = (qb.lo // b) == (qb.hi // b)
        aligned_k = (kb.lo // b) == (kb.hi // b)
        nkb = -(-kb.length // b)
        hit = torch.zeros(broadcast_shape(qb.lo.shape, kb.lo.shape), dtype=torch.bool)
        for j in range(self.n):
            hit |= (kb.lo // b) == random_block_hash(self.seed, h, qb.lo // b, j) % nkb
        exact = aligned_q & aligned_k
        may = torch.where(exact, hit, torch.ones_like(hit))
        must = exact & hit
        return may, must

    def triton(self):
        b = self.block
        terms = []
        for j in range(self.n):
            x = f"((({self.seed * 1000003 + j * 15485863} + off_h * 7919 + (q_pos // {b}) * 104729)) & 0x7FFFFFFF)"
            terms.append(f"((kv_pos // {b}) == (_rb_hash({x}) % ((KV_LEN + {b - 1}) // {b})))")
        return "(" + " | ".join(terms) + ")"

    def to_spec(self):
        return {"random_blocks": {"n": self.n, "seed": self.seed, "block": self.block}}

    @property
    def name(self):
        return f"random{self.n}"


@dataclass(frozen=True)
class Tile3D(Mask):
    """3D neighbourhood on a row-major T x H x W token grid: |dt| <= wt, |dh| <= wh, |dw| <= ww
    (``window`` holds half-extents: the box is (2wt+1) x (2wh+1) x (2ww+1))."""

    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    kind: ClassVar[str] = "tile3d"
    tight: ClassVar[str] = "box"

    def _coords(self, p):
        _, gh, gw = self.grid
        return p // (gh * gw), (p // gw) % gh, p % gw

    def check_len(self, n: int, what: str) -> None:
        total = self.grid[0] * self.grid[1] * self.grid[2]
        if n != total:
            raise MaskError(f"tile3d grid {list(self.grid)} holds {total} tokens but the {what} length is {n}")

    def dense(self, h, q, kv, q_len, kv_len):
        self.check_len(q_len, "query")
        self.check_len(kv_len, "key")
        ok = _on_grid(h, q, kv, True)
        for a, b, w in zip(self._coords(q), self._coords(kv), self.window):
            ok = ok & ((a - b).abs() <= w)
        return ok

    def bounds(self, qb, kb, h):
        qbox, kbox = qb.box(self.grid), kb.box(self.grid)
        may = must = None
        qs, ks = qb.lo.shape, kb.lo.shape
        for axis, w in enumerate(self.window):
            qlo, qhi = qbox[2 * axis].reshape(qs), qbox[2 * axis + 1].reshape(qs)
            klo, khi = kbox[2 * axis].reshape(ks), kbox[2 * axis + 1].reshape(ks)
            a_may, a_must = _in_range(qlo - khi, qhi - klo, -w, w)
            may = a_may if may is None else may & a_may
            must = a_must if must is None else must & a_must
        return may, must

    def triton(self):
        _, gh, gw = self.grid
        wt, wh, ww = self.window
        hw = gh * gw
        # parenthesised whole: `not` and `any` wrap it as one operand
        return (
            f"((tl.abs(q_pos // {hw} - kv_pos // {hw}) <= {wt}) & "
            f"(tl.abs((q_pos // {gw}) % {gh} - (kv_pos // {gw}) % {gh}) <= {wh}) & "
            f"(tl.abs(q_pos % {gw} - kv_pos % {gw}) <= {ww}))"
        )

    def to_spec(self):
        return {"tile3d": {"grid": list(self.grid), "window": list(self.window)}}

    @property
    def name(self):
        return "tile3d"


@dataclass(frozen=True)
class All(Mask):
    items: tuple[Mask, ...]
    kind: ClassVar[str] = "all"
    distance_only: ClassVar[bool] = True

    def children(self):
        return self.items

    def dense(self, h, q, kv, q_len, kv_len):
        out = self.items[0].dense(h, q, kv, q_len, kv_len)
        for m in self.items[1:]:
            out = out & m.dense(h, q, kv, q_len, kv_len)
        return out

    def bounds(self, qb, kb, h):
        may, must = self.items[0].bounds(qb, kb, h)
        for m in self.items[1:]:
            a, b = m.bounds(qb, kb, h)
            may, must = may & a, must & b
        return may, must

    def triton(self):
        return "(" + " & ".join(m.triton() for m in self.items) + ")"

    def to_spec(self):
        return {"all": [m.to_spec() for m in self.items]}

    @property
    def name(self):
        return "_".join(m.name for m in self.items)


@dataclass(frozen=True)
class Any_(Mask):
    items: tuple[Mask, ...]
    kind: ClassVar[str] = "any"
    distance_only: ClassVar[bool] = True

    def children(self):
        return self.items

    def dense(self, h, q, kv, q_len, kv_len):
        out = self.items[0].dense(h, q, kv, q_len, kv_len)
        for m in self.items[1:]:
            out = out | m.dense(h, q, kv, q_len, kv_len)
        return out

    def bounds(self, qb, kb, h):
        may, must = self.items[0].bounds(qb, kb, h)
        for m in self.items[1:]:
            a, b = m.bounds(qb, kb, h)
            may, must = may | a, must | b
        return may, must

    def triton(self):
        return "(" + " | ".join(m.triton() for m in self.items) + ")"

    def to_spec(self):
        return {"any": [m.to_spec() for m in self.items]}

    @property
    def name(self):
        return "_or_".join(m.name for m in self.items)


@dataclass(frozen=True)
class Not(Mask):
    item: Mask
    kind: ClassVar[str] = "not"
    distance_only: ClassVar[bool] = True

    def children(self):
        return (self.item,)

    def dense(self, h, q, kv, q_len, kv_len):
        return ~self.item.dense(h, q, kv, q_len, kv_len)

    def bounds(self, qb, kb, h):
        may, must = self.item.bounds(qb, kb, h)
        return ~must, ~may

    def triton(self):
        return f"(~{self.item.triton()})"

    def to_spec(self):
        return {"not": self.item.to_spec()}

    @property
    def name(self):
        return f"not_{self.item.name}"


@dataclass(frozen=True)
class Selector(Mask):
    """Data-dependent block selection (``topk`` / ``threshold``). Parsed and validated in
    spec v1; executed only where the dynamic-sparsity support is present."""

    method: str  # "topk" | "threshold"
    params: tuple[tuple[str, Any], ...]
    kind: ClassVar[str] = "selector"
    dynamic: ClassVar[bool] = True

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def to_spec(self):
        return {self.method: dict(self.params)}

    def _static(self, what: str):
        raise MaskError(f"'{self.method}' selects blocks from the data at run time and has no static {what}")

    def dense(self, h, q, kv, q_len, kv_len):
        self._static("dense mask")

    def bounds(self, qb, kb, h):
        self._static("block classification")

    def triton(self):
        self._static("predicate")

    @property
    def name(self):
        return self.method


def conj(*masks: Mask | None) -> Mask:
    """Intersection, flattening nested ``all`` and dropping ``full``."""
    items: list[Mask] = []
    for m in masks:
        if m is None or isinstance(m, Full):
            continue
        for x in m.items if isinstance(m, All) else (m,):
            if x not in items:
                items.append(x)
    if not items:
        return Full()
    return items[0] if len(items) == 1 else All(tuple(items))


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


PRIMITIVES = (
    "full",
    "causal",
    "window",
    "sink",
    "prefix",
    "global",
    "chunk",
    "block_causal",
    "strided",
    "power",
    "random_blocks",
    "tile3d",
    "all",
    "any",
    "not",
    "topk",
    "threshold",
)
SELECTOR_SCORES = ("mean_pool", "antidiagonal", "draft")
#: Triton helpers the predicates call (``random_blocks``); a kernel module that uses a
#: predicate containing ``_rb_hash`` includes this source once (it mirrors random_block_hash).
TRITON_HELPERS = f"""
@triton.jit
def _rb_hash(x):
    x = x ^ (x >> 13)
    x = (x * {_HASH_MUL}) & 0x7FFFFFFF
    return x ^ (x >> 16)
"""
