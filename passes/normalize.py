"""normalize: remove operations that are the identity at run time (eval-mode dropout, same-dtype
casts), write in-place arithmetic on fresh tensors out of place (``scores /= sqrt(d)``,
``scores.masked_fill_(...)``) where no later reader can tell, spell ``baddbmm`` (Bloom's fused
bias + QK^T) as its product, scale and sum, and move a ``[B*H] -> [B, H]`` view of the scores (and
its inverse before P @ V) onto the operands, and read ``exp / sum`` as softmax, so detection
reads one spelling of each."""

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


def _same_shape_view(node: fx.Node) -> bool:
    """A view or reshape to the shape it already has (Falcon views its 4-D scores as themselves),
    with nothing mutating either tensor in place (through which the alias would show)."""
    src = node.args[0] if node.args else None
    out, inp = maybe_tensor(node), maybe_tensor(src)
    if out is None or inp is None or tuple(out.shape) != tuple(inp.shape) or not isinstance(src, fx.Node):
        return False
    sizes = [a for s in node.args[1:] for a in (s if isinstance(s, (tuple, list)) else (s,))]
    if node.kwargs or out.dtype != inp.dtype or not all(isinstance(a, (int, torch.SymInt, fx.Node)) for a in sizes):
        return False  # view(dtype) reinterprets the bits: not the identity
    if any(isinstance(a, fx.Node) and not isinstance(val(a), (int, torch.SymInt)) for a in sizes):
        return False
    for n in (node, src):
        for u in n.users:
            if (u.op == "call_function" and u.target in _INPLACE_FUNCTIONS) or (
                u.op == "call_method" and str(u.target).endswith("_")
            ):
                return False
    return True


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


def _emit(g: fx.Graph, op: str, target: Any, args: tuple) -> fx.Node:
    """A new node with the fake example value Dynamo would give it (detection reads shapes)."""
    node = g.call_function(target, args) if op == "call_function" else g.call_method(target, args)
    vals = fx.node.map_arg(args, val)
    fakes = [v for v in (vals if isinstance(vals, tuple) else ()) if isinstance(v, torch.Tensor)]
    mode = getattr(fakes[0], "fake_mode", None) if fakes else None
    if mode is not None:
        with mode:
            fn = target if op == "call_function" else getattr(torch.Tensor, target)
            node.meta["example_value"] = fn(*vals)
    return node


def _split_sizes(node: fx.Node) -> tuple[int, int] | None:
    """(B, H) when ``node`` reshapes a ``[B*H, a, b]`` tensor to ``[B, H, a, b]`` (static sizes)."""
    if kind(node) != "reshape" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, out = maybe_tensor(node.args[0]), maybe_tensor(node)
    if src is None or out is None or src.dim() != 3 or out.dim() != 4:
        return None
    try:
        sizes = [int(x) for x in (*src.shape, *out.shape)]
    except TypeError:
        return None
    bh, a, b, bb, h, a2, b2 = sizes
    return (bb, h) if (bb * h, a, b) == (bh, a2, b2) else None


def _is_bmm(node: fx.Node) -> bool:
    if kind(node) != "matmul" or len(node.args) != 2 or node.kwargs:
        return False
    return all(isinstance(a, fx.Node) and getattr(maybe_tensor(a), "dim", lambda: 0)() == 3 for a in node.args)


def _heads_split_scores(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``view(bmm(q, k) [* c] [+ bias], B, H, Sq, Skv)`` (Bloom, Falcon with ALiBi: scores of
    ``[B*H, S, D]`` operands viewed as ``[B, H, Sq, Skv]`` before the mask and softmax) -> the
    same arithmetic on ``[B, H, ...]`` operands: ``matmul(q.view(B, H, Sq, D), k.view(B, H, D, Skv))``
    and each bias viewed alike. Exact: the same products and sums, element for element. Only
    where every intermediate has no other reader."""
    split = _split_sizes(node)
    if split is None or not _feeds_softmax(node):
        return False
    bsz, heads = split
    chain: list[fx.Node] = []
    cur = node.args[0]
    while isinstance(cur, fx.Node) and not _is_bmm(cur):
        if kind(cur) not in ("mul", "div", "add") or len(cur.users) != 1 or cur.kwargs or len(cur.args) != 2:
            return False
        chain.append(cur)
        nxt = [a for a in cur.args if isinstance(a, fx.Node) and getattr(maybe_tensor(a), "dim", lambda: 0)() == 3]
        if not nxt or (kind(cur) == "div" and cur.args[0] is not nxt[0]):
            return False
        cur = nxt[0] if len(nxt) == 1 or _reaches_bmm(nxt[0]) else nxt[1]
    if not isinstance(cur, fx.Node) or len(cur.users) != 1:
        return False
    g = gm.graph

    def four(x: fx.Node) -> fx.Node:
        t = maybe_tensor(x)
        assert t is not None
        if int(t.shape[0]) == bsz * heads:
            return _emit(g, "call_method", "reshape", (x, bsz, heads, *(int(s) for s in t.shape[1:])))
        return _emit(g, "call_method", "unsqueeze", (x, 0))

    for c in chain:
        for a in c.args:
            t = maybe_tensor(a) if isinstance(a, fx.Node) else None
            if t is not None and t.dim() == 3 and int(t.shape[0]) not in (1, bsz * heads):
                return False
            if t is not None and t.dim() > 3:
                return False
    with g.inserting_before(node):
        q, k = cur.args
        new = _emit(g, "call_function", torch.matmul, (four(q), four(k)))  # type: ignore[arg-type]
        prev = cur
        for c in reversed(chain):
            args = tuple(
                new
                if a is prev
                else four(a)
                if isinstance(a, fx.Node) and maybe_tensor(a) is not None and maybe_tensor(a).dim() == 3
                else a  # type: ignore[union-attr]
                for a in c.args
            )
            new = _emit(g, c.op, c.target, args)
            prev = c
    node.replace_all_uses_with(new)
    for n in [node, *chain, cur]:
        if not n.users:
            g.erase_node(n)
    return True


def _feeds_softmax(node: fx.Node, depth: int = 6) -> bool:
    """The view's value reaches a softmax through score arithmetic (masks, scales, casts): it
    holds scores, not an attention output being split into heads."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                k = kind(u)
                if k == "softmax":
                    return True
                if k in ("add", "mul", "div", "masked_fill", "where", "cast"):
                    nxt.append(u)
        frontier = nxt
    return False


def _reaches_bmm(node: fx.Node, depth: int = 6) -> bool:
    cur: object = node
    for _ in range(depth):
        if not isinstance(cur, fx.Node):
            return False
        if _is_bmm(cur):
            return True
        if kind(cur) not in ("mul", "div", "add"):
            return False
        cur = cur.args[0]
    return False


def _heads_merged_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``bmm(p.view(B*H, Sq, Skv), v [B*H, Skv, E])`` with ``p`` ``[B, H, Sq, Skv]`` (the other half
    of the split above) -> ``matmul(p, v.view(B, H, Skv, E)).view(B*H, Sq, E)``: exact."""
    if not _is_bmm(node):
        return False
    pv, v = node.args
    assert isinstance(pv, fx.Node) and isinstance(v, fx.Node)
    if kind(pv) != "reshape" or not isinstance(pv.args[0], fx.Node):
        return False
    src = pv.args[0]
    while kind(src) in ("cast", "dropout") and isinstance(src.args[0], fx.Node):
        src = src.args[0]
    if kind(src) != "softmax":
        return False  # only probabilities: a product of other views is left as written
    p4, p3, tv = maybe_tensor(pv.args[0]), maybe_tensor(pv), maybe_tensor(v)
    if p4 is None or p3 is None or tv is None or p4.dim() != 4:
        return False
    try:
        b, h, sq, skv = (int(x) for x in p4.shape)
        if tuple(int(x) for x in p3.shape) != (b * h, sq, skv) or int(tv.shape[0]) != b * h:
            return False
        e = int(tv.shape[2])
    except TypeError:
        return False
    g = gm.graph
    with g.inserting_before(node):
        v4 = _emit(g, "call_method", "reshape", (v, b, h, skv, e))
        out4 = _emit(g, "call_function", torch.matmul, (pv.args[0], v4))
        out = _emit(g, "call_method", "reshape", (out4, b * h, sq, e))
    node.replace_all_uses_with(out)
    g.erase_node(node)
    if not pv.users:
        g.erase_node(pv)
    return True


def _last_dim(node: fx.Node, dim: object) -> bool:
    t = maybe_tensor(node)
    return t is not None and isinstance(dim, int) and dim in (-1, t.dim() - 1)


def _exp_sum_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``e / e.sum(-1, keepdim=True)`` with ``e = exp(x)`` or ``exp(x - x.amax(-1, keepdim=True))``
    -> ``softmax(x, -1)``: the same function (softmax subtracts the row maximum itself, so where the
    model's plain ``exp`` would overflow to inf / inf the softmax stays finite). Only where ``e``
    has no other reader."""
    if kind(node) != "div" or len(node.args) != 2 or node.kwargs:
        return False
    e, d = node.args
    if not (isinstance(e, fx.Node) and isinstance(d, fx.Node)):
        return False
    if _op_name_of(e) != "exp" or len(e.args) != 1 or e.kwargs or not isinstance(e.args[0], fx.Node):
        return False
    if _op_name_of(d) != "sum" or d.args[0] is not e or set(e.users) != {d, node} or len(d.users) != 1:
        return False
    dim = d.args[1] if len(d.args) > 1 else d.kwargs.get("dim")
    if not (d.kwargs.get("keepdim") or (len(d.args) > 2 and d.args[2] is True)) or not _last_dim(e, dim):
        return False
    if set(d.kwargs) - {"dim", "keepdim"}:
        return False
    x: fx.Node = e.args[0]
    shifted: list[fx.Node] = []
    # exp(s - s.amax(-1, keepdim=True)): the row maximum softmax subtracts anyway
    if _op_name_of(x) == "sub" and len(x.args) == 2 and len(x.users) == 1:
        s0, m = x.args
        if isinstance(s0, fx.Node) and isinstance(m, fx.Node) and _op_name_of(m) == "amax":
            mdim = m.args[1] if len(m.args) > 1 else m.kwargs.get("dim")
            if m.args[0] is s0 and m.kwargs.get("keepdim") and _last_dim(s0, mdim):
                shifted, x = [x, m], s0
    g = gm.graph
    with g.inserting_before(node):
        sm = _emit(g, "call_function", torch.softmax, (x, -1))
    sm.meta.setdefault("example_value", node.meta.get("example_value", node.meta.get("val")))
    node.replace_all_uses_with(sm)
    for n in (node, d, e, *shifted):
        if not n.users:
            g.erase_node(n)
    return True


def _op_name_of(n: object) -> str:
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return ""
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


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
    """Remove eval-mode dropout, same-dtype casts and same-shape views (each returns its input's
    values unchanged); write
    exact in-place score arithmetic out of place and ``baddbmm`` as product + scale + sum."""
    removed = rewritten = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if _out_of_place(gm, node, order) or _baddbmm(gm, node):
            rewritten += 1
            order = {n: i for i, n in enumerate(gm.graph.nodes)}  # new nodes, new positions
    for node in list(gm.graph.nodes):
        k = kind(node)
        identity = (
            (k == "dropout" and dropout_is_identity(node))
            or (k == "cast" and _same_dtype_cast(node))
            or (k == "reshape" and _same_shape_view(node))
        )
        if identity and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    # after the identities are gone, so eval dropout between softmax and the view does not hide it
    # scores first: the product of a split view is read as QK, not as P @ V of its own operands
    for respell in (_exp_sum_softmax, _heads_split_scores, _heads_merged_values):
        for node in list(gm.graph.nodes):
            if node.graph is gm.graph and respell(gm, node):
                rewritten += 1
    if removed or rewritten:
        commit(gm)
    return NormalizeResult(removed, rewritten)


@dataclass(frozen=True)
class Normalize:
    """Drop identity ops, so eval-mode dropout between softmax and PV does not hide an attention."""

    name: ClassVar[str] = "normalize"

    def __call__(self, gm: fx.GraphModule) -> NormalizeResult:
        return normalize(gm)
