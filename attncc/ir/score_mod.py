"""Score modifications a model applies between ``scale * q.k`` and the softmax, recovered as structure.

Two are closed-form and compiled into every kernel (forward, backward, decode) rather than
read from an S x S tensor, so block skipping keeps working with them:

* soft-capping (Gemma 2/3, Grok): ``s -> cap * tanh(s / cap)``;
* ALiBi (MPT, Bloom, Falcon): ``s -> s + slope[h] * (kv_pos - q_pos)``, one slope per query head,
  over the model's absolute positions (a term that varies per query row only, as MPT's
  ``slope * (kv_pos - (S - 1))``, is the same softmax).

Applied in that order: capping first, then the bias (as Gemma 2 caps before adding its mask).
The model's mask and the spec's mask apply after both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: 2 / ln 2: tanh(x) = (1 - 2^(-2x/ln2)) / (1 + ...), computed with exp2
_TWO_LOG2E = 2.0 / math.log(2.0)

#: Triton helpers of a soft-capped plan (the interpreter has no libdevice tanh)
TANH_SOURCE = f'''\
@triton.jit
def _tanh(x):
    """tanh in fp32 without libdevice: an odd Taylor series for |x| < 1/8 (where 1 - e would
    cancel; its first dropped term is below 2e-10 there), (1 - e) / (1 + e), e = exp(-2|x|), beyond."""
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    e = tl.math.exp2(-{_TWO_LOG2E!r} * tl.abs(x))
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(x < 0, -large, large)
    return tl.where(tl.abs(x) < 0.125, small, large)
'''


@dataclass(frozen=True)
class ScoreMod:
    """A closed-form score modification: ``softcap`` (the cap, > 0) and/or ``alibi`` (one slope
    per query head, natural-log units of the scores)."""

    softcap: float | None = None
    alibi: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap {self.softcap} must be a finite positive number")
        if self.alibi is not None:
            if not self.alibi or not all(math.isfinite(s) for s in self.alibi):
                raise ValueError(f"alibi slopes {self.alibi} must be finite numbers, one per head")
            object.__setattr__(self, "alibi", tuple(float(s) for s in self.alibi))
        if self.softcap is None and self.alibi is None:
            raise ValueError("a ScoreMod needs a softcap or alibi slopes (no modification: use None)")

    def __str__(self) -> str:
        parts = []
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        if self.alibi is not None:
            parts.append(f"alibi slopes [{', '.join(f'{s:.6g}' for s in self.alibi)}]")
        return ", ".join(parts)

    @property
    def name(self) -> str:
        """A short tag for kernel names."""
        return "_".join(t for t, on in (("softcap", self.softcap), ("alibi", self.alibi)) if on is not None)

    def to_spec(self) -> dict:
        d: dict = {}
        if self.softcap is not None:
            d["softcap"] = self.softcap
        if self.alibi is not None:
            d["alibi"] = list(self.alibi)
        return d

    def check_heads(self, num_heads: int) -> None:
        if self.alibi is not None and len(self.alibi) != num_heads:
            raise ValueError(f"alibi has {len(self.alibi)} slopes for {num_heads} heads")

    # -- the dense reference --------------------------------------------------------------------
    def apply(self, scores: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        """``scores [..., H, Sq, Skv]`` (already scaled) modified; query i at ``q_offset + i``,
        key j at j."""
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.alibi is not None:
            sq, skv = scores.shape[-2], scores.shape[-1]
            dist = self._distance(sq, skv, q_offset, scores)
            slopes = torch.tensor(self.alibi, dtype=scores.dtype, device=scores.device)[:, None, None]
            scores = scores + slopes * dist
        return scores

    def grad_factor(self, raw: torch.Tensor) -> torch.Tensor | None:
        """d(modified) / d(raw) at the scaled scores ``raw``, or None where it is 1 everywhere."""
        if self.softcap is None:
            return None
        return 1.0 - torch.tanh(raw / self.softcap) ** 2

    @staticmethod
    def _distance(sq: int, skv: int, q_offset: int, like: torch.Tensor) -> torch.Tensor:
        q = torch.arange(sq, device=like.device, dtype=like.dtype) + q_offset
        kv = torch.arange(skv, device=like.device, dtype=like.dtype)
        return kv[None, :] - q[:, None]

    # -- the Triton helpers ---------------------------------------------------------------------
    def _slope_expr(self) -> str:
        """The query head's slope, baked into the source (the slopes are the kernel's, like its
        mask programs)."""
        assert self.alibi is not None
        expr = repr(self.alibi[-1])
        for h in reversed(range(len(self.alibi) - 1)):
            expr = f"tl.where(off_h == {h}, {self.alibi[h]!r}, {expr})"
        return expr

    def triton_source(self, with_grad: bool = False) -> str:
        """``_score_mod(s, q_pos, kv_pos, off_h, UNIT)``: scores ``s`` [BM, BN] given in ``UNIT``
        per natural-log unit (log2 e in the forward kernels, 1 in the backward) modified, for query
        positions ``q_pos`` [BM, 1], key positions ``kv_pos`` [1, BN] and query head ``off_h``.
        ``with_grad`` (soft-capped plans' backward): ``_score_mod_grad(s, q_pos, kv_pos, off_h)`` in
        natural-log units instead, returning (modified scores, their derivative by ``s``)."""
        body = []
        if self.softcap is not None:
            body.append(f"    cap = {self.softcap!r}" + ("" if with_grad else " * UNIT"))
            body.append("    t = _tanh(s / cap)")
            body.append("    s = cap * t")
        if self.alibi is not None:
            body.append(f"    slope = {self._slope_expr()}" + ("" if with_grad else " * UNIT"))
            body.append("    s = s + slope * (kv_pos - q_pos).to(tl.float32)")
        if with_grad:
            if self.softcap is None:
                raise ValueError("only soft-capping changes the derivative; without it use _score_mod")
            head = "def _score_mod_grad(s, q_pos, kv_pos, off_h):"
            doc = f"{self}: (modified scores, d modified / d s) of s [BM, BN] in natural-log units."
            body.append("    return s, 1.0 - t * t")
        else:
            head = "def _score_mod(s, q_pos, kv_pos, off_h, UNIT: tl.constexpr):"
            doc = f"{self}: scores s [BM, BN] given in UNIT per natural-log unit."
            body.append("    return s")
        helpers = TANH_SOURCE + "\n\n" if self.softcap is not None else ""
        return helpers + "@triton.jit\n" + head + "\n" + f'    """{doc}"""\n' + "\n".join(body) + "\n"
