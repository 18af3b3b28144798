"""normalize: remove operations that are the identity at run time (eval-mode dropout, same-dtype casts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from attncc.passes.graph import arg, commit, val
from attncc.passes.spelling import kind


def dropout_is_identity(node: fx.Node) -> bool:
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", True)
    return training is False or p == 0 or p == 0.0


def _same_dtype_cast(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    out, inp = val(node), val(src)
    if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)):
        return False
    if node.kwargs.get("copy") or (len(node.args) > 3 and node.args[3]):
        return False
    return out.dtype == inp.dtype and out.device == inp.device and out.shape == inp.shape


@dataclass(frozen=True)
class NormalizeResult:
    removed: int

    def summary(self) -> str:
        return f"removed {self.removed} identity ops (eval dropout, same-dtype casts)"


def normalize(gm: fx.GraphModule) -> NormalizeResult:
    """Remove eval-mode dropout and same-dtype casts (both return their input unchanged)."""
    removed = 0
    for node in list(gm.graph.nodes):
        k = kind(node)
        identity = (k == "dropout" and dropout_is_identity(node)) or (k == "cast" and _same_dtype_cast(node))
        if identity and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        commit(gm)
    return NormalizeResult(removed)


@dataclass(frozen=True)
class Normalize:
    """Drop identity ops, so eval-mode dropout between softmax and PV does not hide an attention."""

    name: ClassVar[str] = "normalize"

    def __call__(self, gm: fx.GraphModule) -> NormalizeResult:
        return normalize(gm)
