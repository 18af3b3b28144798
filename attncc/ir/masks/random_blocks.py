"""``{random_blocks: {n, seed, block}}``: BigBird-style random kv blocks per query block and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attncc.ir.masks.args import NONNEG, POS, need_int, need_mapping, params
from attncc.ir.masks.base import Mask, broadcast_shape, on_grid, register

_HASH_MUL = 1274126177
#: most random blocks per query block (each is one term of the kernel's predicate)
MAX_N = 64

#: the Triton twin of :func:`random_block_hash` (whose first mixing step the predicate inlines)
TRITON_HASH = f"""
@triton.jit
def _rb_hash(x):
    # attncc.ir.masks.random_blocks.random_block_hash: all intermediates stay below 2**63
    x = x ^ (x >> 13)
    x = (x * {_HASH_MUL}) & 0x7FFFFFFF
    return x ^ (x >> 16)
"""


def random_block_hash(seed: int, head, qblock, j: int):
    """The 31-bit hash behind ``random_blocks``; works on ints and int64 tensors alike
    and is emitted identically in Triton (all intermediate values stay below 2**63)."""
    x = (seed * 1000003 + head * 7919 + qblock * 104729 + j * 15485863) & 0x7FFFFFFF
    x = x ^ (x >> 13)
    x = (x * _HASH_MUL) & 0x7FFFFFFF
    return x ^ (x >> 16)


def _parse(arg, path, child):
    need_mapping(arg, path, "random_blocks", ["n", "seed", "block"], [], "{n: N, seed: S, block: B}")
    return RandomBlocks(
        need_int(arg.get("n"), path + ("n",), "random_blocks.n", 1, MAX_N),
        need_int(arg.get("seed", 0), path + ("seed",), "random_blocks.seed", 0),
        need_int(arg.get("block", 64), path + ("block",), "random_blocks.block"),
    )


@register(
    "random_blocks",
    "query block q//B sees n hashed kv blocks of size B (default 64)",
    params({"n": {**POS, "maximum": MAX_N}, "seed": NONNEG, "block": POS}, ["n"]),
    _parse,
)
@dataclass(frozen=True)
class RandomBlocks(Mask):
    """BigBird-style random blocks: with B = block, query block qb = q // B sees kv block
    (random_block_hash(seed, head, qb, j) % ceil(kv_len / B)) for j < n (up to n distinct)."""

    n: int
    seed: int
    block: int = 64
    kind: ClassVar[str] = "random_blocks"
    uses_head: ClassVar[bool] = True
    uses_lengths: ClassVar[bool] = True

    def dense(self, h, q, kv, q_len, kv_len):
        nkb = -(-kv_len // self.block)
        qblk, kblk = q // self.block, kv // self.block
        out = on_grid(h, q, kv, False).clone()
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

    def triton_helpers(self):
        return (TRITON_HASH,)

    def to_spec(self):
        return {"random_blocks": {"n": self.n, "seed": self.seed, "block": self.block}}

    @property
    def name(self):
        return f"random{self.n}"
