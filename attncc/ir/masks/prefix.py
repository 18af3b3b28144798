"""``{prefix: N}``: kv < N, a bidirectional prefix (compose with causal for prefix-LM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.args import POS
from attncc.ir.masks.base import register
from attncc.ir.masks.sink import Sink


@register("prefix", "kv < N (bidirectional prefix)", POS)
@dataclass(frozen=True)
class Prefix(Sink):
    """kv < n: a bidirectional prefix (compose with causal for prefix-LM)."""

    kind: ClassVar[str] = "prefix"
