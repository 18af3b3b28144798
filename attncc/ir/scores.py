"""Selector scores by name: how a data-dependent selector estimates each block's attention mass.

A score summarises groups of tokens into feature rows (``features``): the group mean
(``mean``), or the group's tokens laid end to end with query groups reversed (``antidiagonal``:
a feature product is then the sum along the antidiagonal of the group's score tile). The group
is the selector block unless the score has its own group parameter (``group_param``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Score:
    name: str
    features: Literal["mean", "antidiagonal"]
    #: the selector parameter that sets the token group ('stride', 'pool'), or None: the block
    group_param: str | None
    #: that parameter's default (capped by the selector block)
    default_group: int | None
    description: str

    def group(self, given: int | None, block: int) -> int:
        """Tokens per feature row for a selector block of ``block`` tokens."""
        if self.group_param is None:
            return block
        assert self.default_group is not None
        return given if given is not None else min(self.default_group, block)


SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score("mean_pool", "mean", None, None, "mean-pooled q and k per block (MoBA, VMoBA)"),
        Score("antidiagonal", "antidiagonal", "stride", 8, "antidiagonal sums of stride x stride tiles (XAttention)"),
        Score("draft", "mean", "pool", 16, "a downsampled q k^T from pool-token means (DraftAttention)"),
    )
}
#: the parameters that set a score's token group
GROUP_PARAMS = tuple(sorted({s.group_param for s in SCORES.values() if s.group_param}))
