"""normalize: canonical names for the torch-level spellings of attention ops, and drop identity ops.

Dynamo graphs spell one operation many ways (``torch.matmul`` / ``operator.matmul`` /
``Tensor.matmul``; ``F.softmax`` / ``torch.softmax`` / ``x.softmax``). :func:`kind` maps every
spelling to one canonical name, so detection reads semantics, not spellings. The pass itself
removes operations that are the identity at run time: dropout in eval mode (or ``p=0``), and
dtype casts to the dtype the tensor already has.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

_FUNCTIONS: dict[object, str] = {
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    torch.einsum: "einsum",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    torch.nn.functional.softmax: "softmax",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.permute: "permute",
    torch.reshape: "reshape",
    torch.mul: "mul",
    operator.mul: "mul",
    torch.div: "div",
    operator.truediv: "div",
    torch.add: "add",
    operator.add: "add",
    torch.masked_fill: "masked_fill",
    torch.where: "where",
    F.dropout: "dropout",
    torch.dropout: "dropout",
    torch.repeat_interleave: "repeat_interleave",
    torch.unsqueeze: "unsqueeze",
    torch.flatten: "flatten",
    operator.getitem: "getitem",
    F.scaled_dot_product_attention: "sdpa",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    torch.logical_not: "not",
    operator.invert: "not",
}
_METHODS = {
    "matmul": "matmul",
    "bmm": "matmul",
    "__matmul__": "matmul",
    "softmax": "softmax",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "permute": "permute",
    "view": "reshape",
    "reshape": "reshape",
    "mul": "mul",
    "__mul__": "mul",
    "div": "div",
    "__truediv__": "div",
    "add": "add",
    "__add__": "add",
    "masked_fill": "masked_fill",
    "to": "cast",
    "type": "cast",
    "float": "cast",
    "half": "cast",
    "bfloat16": "cast",
    "double": "cast",
    "type_as": "cast",
    "expand": "expand",
    "repeat_interleave": "repeat_interleave",
    "unsqueeze": "unsqueeze",
    "flatten": "flatten",
    "contiguous": "contiguous",
    "logical_not": "not",
    "__invert__": "not",
    "mT": "mT",
}


def kind(node: fx.Node) -> str | None:
    """The canonical operation name of ``node`` or None when attention detection ignores it."""
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)  # type: ignore[arg-type]
    return None


def val(node: object) -> object:
    """The example value (FakeTensor, SymInt or Python value) recorded on an FX node."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Positional-or-keyword argument ``name`` at ``index``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
        gm.graph.lint()
        gm.recompile()
    return NormalizeResult(removed)
