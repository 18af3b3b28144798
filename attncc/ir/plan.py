"""The plan IR: everything a kernel needs to know about one bound attention site."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

import torch

from attncc.ir import masks as M
from attncc.ir.blocks import EMPTY, FULL, PARTIAL, BlockTable, build_block_table, count_allowed
from attncc.ir.dtypes import DTYPES, DTypeName
from attncc.ir.permute import TilePermutation
from attncc.ir.score_mod import ScoreMod

#: the model's run-time mask: a bool or additive tensor broadcasting to [B, H, Sq, Skv], or the
#: document id of every key position, [B, Skv] (:mod:`attncc.ir.documents`)
MaskKind = Literal["bool", "additive", "documents"]
#: where the queries sit among the keys: ``start`` (query i at ``q_offset + i``; 0 for prefill and
#: encoders), ``end`` (at ``kv_len - q_len + i``: new keys appended to a cache) or ``given`` (at
#: consecutive positions each call passes, from ``q_offset``: keys written into a cache at
#: ``cache_position``)
QueryPositions = Literal["start", "end", "given"]


@dataclass(frozen=True)
class AttentionPlan:
    """A bound attention site. Layout contract of every executor: q ``[B, H, Sq, D]``,
    k/v ``[B, Hkv, Skv, D]`` / ``[B, Hkv, Skv, Dv]``, output ``[B, H, Sq, Dv]``, all in the
    model's token order; ``mask_tensor`` (when ``mask_kind`` is set) broadcasts to
    ``[B, H, Sq, Skv]``: bool (True = may attend) or additive float.

    ``programs[head_to_program[h]]`` is head ``h``'s final mask: the spec mask already
    intersected with the model's structural mask, both over absolute positions: key j at j,
    query i at ``q_offset + i`` (``q_positions`` says where ``q_offset`` comes from; see
    :meth:`at`). Rows left with no key output zeros.
    """

    programs: tuple[M.Mask, ...]
    head_to_program: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    head_dim_v: int
    dtype: DTypeName
    scale: float
    block_q: int = 64
    block_kv: int = 64
    permute: TilePermutation | None = None
    mask_kind: MaskKind | None = None
    q_offset: int = 0
    q_positions: QueryPositions = "start"
    #: k/v come with a per-(batch, kv head) key order given at call time (PBS-Attn): kernel
    #: slot -> model key position, ``[B, Hkv, Skv]``; queries keep model order
    runtime_key_order: bool = False
    #: soft-capping / ALiBi the model applies to ``scale * q.k`` before its mask and the softmax,
    #: compiled into the kernels (:mod:`attncc.ir.score_mod`)
    score_mod: ScoreMod | None = None
    rule: str = ""
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if len(self.head_to_program) != self.num_heads:
            raise ValueError(f"head_to_program has {len(self.head_to_program)} entries for {self.num_heads} heads")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.mask_kind not in (None, "bool", "additive", "documents"):
            raise ValueError(f"mask_kind {self.mask_kind!r} is not None, 'bool', 'additive' or 'documents'")
        if self.q_positions not in ("start", "end", "given"):
            raise ValueError(f"q_positions {self.q_positions!r} is not 'start', 'end' or 'given'")
        if self.q_positions == "end":
            # bottom-right: the queries are the last q_len keys
            object.__setattr__(self, "q_offset", self.kv_len - self.q_len)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads do not group into {self.num_kv_heads} kv heads")
        # block tables are built per program from one representative head; a head-dependent mask
        # (random_blocks) has a different block structure per head, so each head gets its own program
        if any(p.depends_on_head and self.head_to_program.count(i) > 1 for i, p in enumerate(self.programs)):
            programs: list[M.Mask] = []
            index: list[int] = []
            seen: dict[tuple[int, int], int] = {}
            for h, i in enumerate(self.head_to_program):
                key = (i, h if self.programs[i].depends_on_head else -1)
                if key not in seen:
                    seen[key] = len(programs)
                    programs.append(self.programs[i])
                index.append(seen[key])
            object.__setattr__(self, "programs", tuple(programs))
            object.__setattr__(self, "head_to_program", tuple(index))
        if self.mask_kind == "documents" and self.is_dynamic:
            raise ValueError("data-dependent block selection does not run over packed documents")
        if self.mask_kind == "documents" and (self.permute is not None or self.runtime_key_order):
            raise ValueError("documents are read in model order: a plan with documents takes no permutation")
        if self.permute is not None and self.runtime_key_order:
            raise ValueError("a plan has either a static permutation or a run-time key order, not both")
        if self.permute is not None:
            self.permute.check(self.q_len, "query")
            self.permute.check(self.kv_len, "key")
        for p in self.programs:
            p.check_lengths(self.q_len, self.kv_len)
        if self.score_mod is not None:
            self.score_mod.check_heads(self.num_heads)

    @classmethod
    def of(
        cls,
        *programs: M.Mask,
        num_heads: int,
        q_len: int,
        head_dim: int,
        kv_len: int | None = None,
        num_kv_heads: int | None = None,
        head_dim_v: int | None = None,
        head_to_program: tuple[int, ...] | None = None,
        dtype: DTypeName = "float32",
        scale: float | None = None,
        block: int = 64,
        block_kv: int | None = None,
        **fields,
    ) -> AttentionPlan:
        """A plan with the usual defaults: ``programs`` (default ``full``), head ``h`` on program
        ``min(h, last)``, kv as long as q, a kv head per query head, Dv = D, scale D^-1/2,
        ``block`` x ``block`` tiles; ``fields``: the other plan fields (permute, mask_kind, ...)."""
        programs = programs or (M.Full(),)
        if head_to_program is None:
            head_to_program = tuple(min(h, len(programs) - 1) for h in range(num_heads))
        return cls(
            programs=tuple(programs),
            head_to_program=tuple(head_to_program),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads or num_heads,
            q_len=q_len,
            kv_len=q_len if kv_len is None else kv_len,
            head_dim=head_dim,
            head_dim_v=head_dim if head_dim_v is None else head_dim_v,
            dtype=dtype,
            scale=head_dim**-0.5 if scale is None else scale,
            block_q=block,
            block_kv=block_kv or block,
            **fields,
        )

    def at(self, q_len: int, kv_len: int, q_offset: int | None = None, scale: float | None = None) -> AttentionPlan:
        """The same plan for a call with these lengths (for ``given`` positions, the first query's
        position; for a scale the model reads at run time, its value): what a graph compiled at one
        shape runs at another."""
        q_offset = self.q_offset if q_offset is None else q_offset
        scale = self.scale if scale is None else scale
        if (q_len, kv_len, q_offset, scale) == (self.q_len, self.kv_len, self.q_offset, self.scale):
            return self
        return dataclasses.replace(self, q_len=q_len, kv_len=kv_len, q_offset=q_offset, scale=scale)

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype].torch

    @property
    def is_dynamic(self) -> bool:
        """True when some program selects blocks from the data at run time."""
        return any(p.is_dynamic for p in self.programs)

    def heads_of(self, program: int) -> list[int]:
        """The heads whose mask is program ``program``, ascending."""
        return [h for h, j in enumerate(self.head_to_program) if j == program]

    @property
    def pattern(self) -> str:
        """Short name of the mask pattern, used in kernel names."""
        names = sorted({p.name for p in self.programs})
        s = "heads_" + "_".join(names) if len(names) > 1 else names[0]
        tags = ([self.score_mod.name] if self.score_mod is not None else []) + (
            ["documents"] if self.mask_kind == "documents" else []
        )
        if tags:
            tag = "_".join(tags)
            s = f"{s[: 47 - len(tag)]}_{tag}"
        return "".join(c if c.isalnum() or c == "_" else "_" for c in s)[:48]

    def to_dict(self) -> dict:
        d = {
            "rule": self.rule,
            "programs": [p.to_spec() for p in self.programs],
            "head_to_program": list(self.head_to_program),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "head_dim_v": self.head_dim_v,
            "dtype": self.dtype,
            "scale": self.scale,
            "block_q": self.block_q,
            "block_kv": self.block_kv,
            "permute": self.permute.to_spec() if self.permute else None,
            "mask_kind": self.mask_kind,
            "q_offset": self.q_offset,
        }
        if self.q_positions != "start":  # only when set, so the keys of other plans stay as they were
            d["q_positions"] = self.q_positions
        if self.runtime_key_order:  # only when set, so the keys of other plans stay as they were
            d["runtime_key_order"] = True
        if self.score_mod is not None:  # only when set, so the keys of other plans stay as they were
            d["score_mod"] = self.score_mod.to_spec()
        return d

    def key(self) -> str:
        """Stable hash of everything that changes the computation."""
        d = self.to_dict()
        d.pop("rule")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def kernel_key(self) -> tuple:
        """What the generated kernel sources depend on: the mask programs, which heads take which,
        the dtype, a run-time key order and the score modification. Everything else (lengths, the
        query offset, head dims, block sizes, the permutation, the model's mask tensor) reaches a
        kernel at launch, so plans differing only there share one compiled module."""
        documents = self.mask_kind == "documents"
        return (self.programs, self.head_to_program, self.dtype, self.runtime_key_order, self.score_mod, documents)

    def describe_kernel(self) -> str:
        """The part of :meth:`describe` a kernel source depends on (:meth:`kernel_key`)."""
        lines = [
            f"{self.dtype}; {self.num_heads} heads" + (", keys in a run-time order" if self.runtime_key_order else "")
        ]
        if self.score_mod is not None:
            lines.append(f"scores modified: {self.score_mod}")
        if self.mask_kind == "documents":
            lines.append("documents: a key is seen only from its own document (ids per key position at launch)")
        for i, p in enumerate(self.programs):
            lines.append(f"program {i} heads {ranges(self.heads_of(i))}: {p}")
        lines.append("lengths, offsets, head dims, block sizes, permutation and mask tensor: launch arguments")
        return "\n".join(lines)

    def describe(self) -> str:
        """A human-readable print of the plan."""
        lines = [f"plan {self.key()}  rule={self.rule or '-'}"]
        lines.append(
            f"  heads {self.num_heads} (kv {self.num_kv_heads}), q_len {self.q_len}, kv_len {self.kv_len}, "
            f"head_dim {self.head_dim}/{self.head_dim_v}, {self.dtype}, scale {self.scale:.6g}"
        )
        permute = self.permute.to_spec() if self.permute else "none"
        lines.append(
            f"  blocks {self.block_q}x{self.block_kv}, {self._positions_text()}, "
            f"permute {permute}, model mask tensor {self.mask_kind or 'none'}"
        )
        if self.runtime_key_order:
            lines.append("  keys in a run-time order per (batch, kv head); queries in model order")
        if self.score_mod is not None:
            lines.append(f"  scores modified before the mask: {self.score_mod}")
        for i, p in enumerate(self.programs):
            lines.append(f"  program {i} heads {ranges(self.heads_of(i))}: {p}")
        return "\n".join(lines)

    def _positions_text(self) -> str:
        if self.q_positions == "end":
            return f"queries at the end of the keys (q_offset {self.q_offset})"
        if self.q_positions == "given":
            return f"queries at the positions each call gives (q_offset {self.q_offset})"
        return f"q_offset {self.q_offset}"

    # -- derived data -----------------------------------------------------------------------
    def program_heads(self) -> list[int]:
        """A representative head per program (for head-dependent masks)."""
        return [self.head_to_program.index(i) for i in range(len(self.programs))]

    def order(self, device=None) -> torch.Tensor | None:
        return None if self.permute is None else self.permute.index(device)

    def block_table(self, device=None) -> BlockTable:
        return _block_table(self).to(device) if device is not None else _block_table(self)

    def dense_mask(self, device=None) -> torch.Tensor:
        """[H, Sq, Skv] bool in model order: the structural part of the plan's mask."""
        out = torch.empty(self.num_heads, self.q_len, self.kv_len, dtype=torch.bool, device=device)
        for i, prog in enumerate(self.programs):
            heads = self.heads_of(i)
            out[heads] = M.dense(prog, self.q_len, self.kv_len, heads=heads, q_offset=self.q_offset, device=device)
        return out


def _block_table(plan: AttentionPlan) -> BlockTable:
    for p in plan.programs:
        if p.is_dynamic:
            raise ValueError(f"mask {p} selects blocks at run time and has no static block table")
    # keyed on what the table depends on, so plans differing only in dtype, head dim, scale or
    # rule share one table (the head matters only to head-dependent masks)
    heads = tuple(h if p.depends_on_head else 0 for p, h in zip(plan.programs, plan.program_heads()))
    return _cached_block_table(
        plan.programs, heads, plan.q_len, plan.kv_len, plan.block_q, plan.block_kv, plan.permute, plan.q_offset
    )


#: a table is O(query blocks x widest row): at 1M tokens a causal one is ~1 GiB, so keep few
@functools.lru_cache(maxsize=8)
def _cached_block_table(
    programs: tuple[M.Mask, ...],
    heads: tuple[int, ...],
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    permute: TilePermutation | None,
    q_offset: int,
) -> BlockTable:
    order = None if permute is None else permute.index()
    return build_block_table(list(programs), list(heads), q_len, kv_len, block_q, block_kv, order, order, q_offset)


def ranges(xs: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'``."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


@dataclass(frozen=True)
class ProgramDensity:
    """One mask program of a plan over its heads: allowed (q, kv) pairs and block counts."""

    program: int
    heads: tuple[int, ...]
    allowed: int
    empty: int
    partial: int
    full: int

    @property
    def blocks(self) -> int:
        return self.empty + self.partial + self.full

    @property
    def visited(self) -> int:
        """(query block, kv block) pairs a kernel visits: partial and full ones."""
        return self.partial + self.full


@dataclass(frozen=True)
class PlanDensity:
    """How sparse a static plan is, exactly and without S x S (the structural mask only)."""

    q_len: int
    kv_len: int
    programs: tuple[ProgramDensity, ...]
    head_to_program: tuple[int, ...]

    def head(self, h: int) -> float:
        """Fraction of (query, key) pairs head ``h`` may attend."""
        return self.programs[self.head_to_program[h]].allowed / (self.q_len * self.kv_len)

    def per_head(self, digits: int = 4) -> list[float]:
        return [round(self.head(h), digits) for h in range(len(self.head_to_program))]


def plan_density(plan: AttentionPlan) -> PlanDensity:
    """Allowed pairs and EMPTY/PARTIAL/FULL block counts per mask program (ValueError for a plan
    that selects blocks at run time: its density depends on the data)."""
    if plan.is_dynamic:
        raise ValueError("a plan that selects blocks from the data has no static density")
    order = plan.order()
    programs = []
    for i, (prog, head) in enumerate(zip(plan.programs, plan.program_heads())):
        allowed, counts = count_allowed(
            prog, plan.q_len, plan.kv_len, plan.block_q, plan.block_kv, head, order, order, plan.q_offset
        )
        programs.append(
            ProgramDensity(
                i, tuple(plan.heads_of(i)), allowed, int(counts[EMPTY]), int(counts[PARTIAL]), int(counts[FULL])
            )
        )
    return PlanDensity(plan.q_len, plan.kv_len, tuple(programs), plan.head_to_program)
