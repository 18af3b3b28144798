"""normalize: remove operations that are the identity at run time (eval-mode dropout, same-dtype
casts), write in-place arithmetic on fresh tensors out of place (``scores /= sqrt(d)``,
``scores.masked_fill_(...)``) where no later reader can tell, and spell ``baddbmm`` (Bloom's fused
bias + QK^T) as its product, scale and sum, so detection reads one spelling of each."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from attncc.passes.graph import arg, commit, maybe_tensor, val
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


#: in-place operator -> its out-of-place twin (``x /= c`` is ``operator.itruediv(x, c)``)
_INPLACE_FUNCTIONS = {
    operator.itruediv: operator.truediv,
    operator.imul: operator.mul,
    operator.iadd: operator.add,
    operator.isub: operator.sub,
}
#: in-place methods -> their out-of-place names
_INPLACE_METHODS = {"div_": "div", "mul_": "mul", "add_": "add", "sub_": "sub", "masked_fill_": "masked_fill"}
#: operations whose result is a fresh tensor (never a view or the input itself): mutating it in
#: place cannot reach any other tensor (einsum is not: it may return a view of its operand)
_FRESH = {"matmul", "mul", "div", "add", "masked_fill", "softmax", "where"}


def _same_dtype(node: fx.Node, base: fx.Node) -> bool:
    """The in-place op computes in ``base``'s dtype; its out-of-place twin computes the same only
    when no operand promotes it (a tensor of another dtype would: fp16 scores += fp32 mask)."""
    b = maybe_tensor(base)
    if b is None or not b.dtype.is_floating_point:
        return False
    for a in [*node.args[1:], *node.kwargs.values()]:
        if isinstance(a, fx.Node):
            t = maybe_tensor(a)
            if t is None or (t.dtype != b.dtype and t.dtype != torch.bool):
                return False
        elif not isinstance(a, (int, float, bool)):
            return False
    return True


def _out_of_place(gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Rewrite ``node`` (an in-place op on its first argument) out of place when that is exact:
    the mutated tensor is fresh (no view, input or alias of anything else), so its readers after
    the mutation (``scores.masked_fill_(m, v)`` as a statement, then ``scores`` used) read the
    new value instead and its readers before it the old one, as they did."""
    target: Any
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        target, op = _INPLACE_FUNCTIONS[node.target], "call_function"
    elif node.op == "call_method" and str(node.target) in _INPLACE_METHODS:
        target, op = _INPLACE_METHODS[str(node.target)], "call_method"
    else:
        return False
    base = node.args[0] if node.args else None
    if not isinstance(base, fx.Node) or base.op not in ("call_function", "call_method") or kind(base) not in _FRESH:
        return False
    if node.kwargs or not _same_dtype(node, base):
        return False  # rounding modes, alpha=, dtype promotion: not the plain arithmetic read here
    if any(u is not node and order[u] < order[node] for u in base.users):
        return False  # read (perhaps viewed, sharing the mutated storage) before the mutation
    later = [u for u in base.users if u is not node and order[u] > order[node]]
    with gm.graph.inserting_before(node):
        new = (gm.graph.call_function if op == "call_function" else gm.graph.call_method)(
            target, node.args, dict(node.kwargs)
        )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    for u in later:  # they read the tensor after the mutation: its new value
        u.replace_input_with(base, new)
    gm.graph.erase_node(node)
    return True


def _baddbmm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``baddbmm(input, b1, b2, beta=, alpha=)`` -> ``alpha * (b1 @ b2) + beta * input`` (with
    ``beta == 0`` the input is not read, as torch defines it)."""
    is_fn = node.op == "call_function" and node.target in (torch.baddbmm, torch.Tensor.baddbmm)
    is_method = node.op == "call_method" and str(node.target) == "baddbmm"
    if not (is_fn or is_method):
        return False
    names = ("input", "batch1", "batch2")
    given = dict(zip(names, node.args[:3]))
    given.update({k: v for k, v in node.kwargs.items() if k in names})
    if len(node.args) > 3 or set(given) != set(names):
        return False
    inp, b1, b2 = (given[n] for n in names)
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"beta", "alpha", *names} or not all(isinstance(x, (int, float)) for x in (beta, alpha)):
        return False
    if not all(isinstance(x, fx.Node) for x in (inp, b1, b2)):
        return False
    ts = [maybe_tensor(x) for x in (inp, b1, b2)]
    # fp32/fp64 only: in fp16/bf16 baddbmm scales and adds in its accumulator, the decomposition
    # would round the product first and change the model's scores where the site is not rewritten
    if any(t is None or t.dtype not in (torch.float32, torch.float64) for t in ts):
        return False
    g = gm.graph
    with g.inserting_before(node):
        out = g.call_function(torch.bmm, (b1, b2))
        out.meta = dict(node.meta)
        if alpha != 1:
            out = g.call_function(operator.mul, (out, alpha))
            out.meta = dict(node.meta)
        if beta != 0:
            bias = inp
            if beta != 1:
                bias = g.call_function(operator.mul, (inp, beta))
                bias.meta = dict(inp.meta)  # type: ignore[union-attr]
            out = g.call_function(operator.add, (out, bias))
            out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return True


@dataclass(frozen=True)
class NormalizeResult:
    removed: int
    rewritten: int = 0

    def summary(self) -> str:
        return (
            f"removed {self.removed} identity ops (eval dropout, same-dtype casts); "
            f"respelled {self.rewritten} (in-place arithmetic out of place, baddbmm)"
        )


def normalize(gm: fx.GraphModule) -> NormalizeResult:
    """Remove eval-mode dropout and same-dtype casts (both return their input unchanged); write
    exact in-place score arithmetic out of place and ``baddbmm`` as product + scale + sum."""
    removed = rewritten = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if _out_of_place(gm, node, order) or _baddbmm(gm, node):
            rewritten += 1
            order = {n: i for i, n in enumerate(gm.graph.nodes)}  # new nodes, new positions
    for node in list(gm.graph.nodes):
        k = kind(node)
        identity = (k == "dropout" and dropout_is_identity(node)) or (k == "cast" and _same_dtype_cast(node))
        if identity and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed or rewritten:
        commit(gm)
    return NormalizeResult(removed, rewritten)


@dataclass(frozen=True)
class Normalize:
    """Drop identity ops, so eval-mode dropout between softmax and PV does not hide an attention."""

    name: ClassVar[str] = "normalize"

    def __call__(self, gm: fx.GraphModule) -> NormalizeResult:
        return normalize(gm)
