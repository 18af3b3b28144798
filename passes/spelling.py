"""One canonical name per torch-level spelling of the operations attention is made of.

Dynamo graphs spell one operation many ways (``torch.matmul`` / ``operator.matmul`` /
``Tensor.matmul``; ``F.softmax`` / ``torch.softmax`` / ``x.softmax``). :func:`kind` maps every
spelling to one canonical name, so the passes read semantics, not spellings. The tables are
data: a new spelling is one entry.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

#: ``call_function`` targets -> canonical names
FUNCTIONS: dict[object, str] = {
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
    torch.tanh: "tanh",
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
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.index_copy: "index_copy",
}
#: ``call_method`` names -> canonical names
METHODS: dict[str, str] = {
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
    "tanh": "tanh",
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
    "index_copy": "index_copy",
    "index_copy_": "index_copy",
    "item": "item",
}


def kind(node: fx.Node) -> str | None:
    """The canonical operation name of ``node`` or None when attention detection ignores it."""
    if node.op == "call_function":
        return FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return METHODS.get(str(node.target))
    return None
