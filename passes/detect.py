"""detect: find attention sites (SDPA calls and hand-written softmax(QK^T)V) in a Dynamo FX graph.

A site is described in roles, not spellings: every operand is a node plus the permutation that
brings it to the canonical layout (batch..., seq, dim), so ``matmul``/``bmm``/``einsum``,
transposes, permutes and ``[B, S, H, D]`` layouts all reduce to the same record. The model's own
mask is recovered into the site: ``is_causal``, or a mask subgraph computed from positions only
(evaluated and proven equal to causal / a sliding window / full), or else kept as a tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import networkx as nx
import torch
from torch import fx

from attncc.ir import masks as M
from attncc.ir.documents import documents_of_positions, same_document
from attncc.passes.graph import (
    arg,
    constant_subgraph,
    depends_on,
    escaping_nodes,
    evaluate,
    evaluate_with,
    input_sources,
    maybe_tensor,
    tensor_val,
    to_networkx,
    val,
)
from attncc.passes.positions import QueryPositions, query_positions, same_size
from attncc.passes.spelling import kind

Role = str  # "b0", "b1", ... batch; "q", "k" sequence; "d" qk dim; "e" value dim
TermKind = Literal["additive", "allow", "disallow"]
# masked_fill / where with a value at or below this is treated as excluding the key
_EXCLUDE_BELOW = -1e4


class NotASite(Exception):
    """Raised inside detection: ``reason`` says why this candidate is not rewritten."""

    def __init__(self, reason: str, attention_like: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.attention_like = attention_like


@dataclass
class Operand:
    """``node.permute(perm)`` has the canonical role order; ``roles`` are node's own dims."""

    node: fx.Node
    roles: list[Role]

    def perm(self, order: list[Role]) -> list[int]:
        return [self.roles.index(r) for r in order]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(tensor_val(self.node).shape)

    def size(self, role: Role) -> int:
        """The size of dim ``role`` (a SymInt where the graph is traced with dynamic shapes)."""
        return tensor_val(self.node).shape[self.roles.index(role)]


@dataclass
class MaskTerm:
    """One mask applied to the scores: ``node`` broadcasts to the scores in their layout ``roles``."""

    node: fx.Node
    kind: TermKind
    factor: float = 1.0
    structural: M.Mask | None = None
    #: an additive term proven an ALiBi bias: per query head ``slope * (kv_pos - q_pos)`` plus a
    #: constant per row (which no softmax sees), slopes in score units (``factor`` applied)
    alibi: tuple[float, ...] | None = None
    #: a bool term proven "same document" over a graph input (``documents_source``): its
    #: ``ids`` directly, or the documents its ``positions`` (packed position ids) imply; the
    #: term's ``structural`` part (full / causal) holds beside it
    documents: Literal["ids", "positions"] | None = None
    documents_source: fx.Node | None = None
    #: the value a masked_fill / where writes into excluded scores (checked after the scales)
    fill: float | None = None


@dataclass
class AttentionSite:
    """One attention in the graph, in canonical roles. ``out`` is the node whose value the
    rewritten call replaces; ``nodes`` is the site's subgraph (replaced as a unit)."""

    index: int
    source: Literal["sdpa", "explicit"]
    q: Operand
    k: Operand
    v: Operand
    out: fx.Node
    out_roles: list[Role]
    score_roles: list[Role]
    batch: list[Role]
    scale: float
    terms: list[MaskTerm]
    nodes: list[fx.Node]
    module: str
    layer: int
    layer_from_path: bool
    heads_known: bool = True
    gqa: str = "none"
    is_causal: bool = False
    #: the scale when the model reads it at run time (``scale`` is then a nominal value)
    runtime_scale: RuntimeScale | None = None
    #: the cap of a soft-capping ``cap * tanh(scale * q.k / cap)`` before the mask (None: none)
    softcap: float | None = None
    #: where the queries sit among the keys (set by detection, see passes/positions.py), and the
    #: first query's position when the model's own mask fixes it
    positions: QueryPositions = QueryPositions("start", "")
    q_offset: int = 0
    notes: list[str] = field(default_factory=list)

    # -- shapes ----------------------------------------------------------------------------------
    def _batch_sizes(self) -> tuple[int, int]:
        sizes = [int(self.q.size(r)) for r in self.batch]
        if len(sizes) == 2:
            return sizes[0], sizes[1]
        if len(sizes) == 1:
            return (1, sizes[0]) if not self.heads_known else (sizes[0] // self.split_heads, self.split_heads)
        return 1, 1

    split_heads: int = 1

    @property
    def batch_size(self) -> int:
        return self._batch_sizes()[0]

    @property
    def num_heads(self) -> int:
        return self._batch_sizes()[1]

    @property
    def num_kv_heads(self) -> int:
        if len(self.batch) == 2:
            return int(self.k.size(self.batch[1]))
        if len(self.batch) == 1:
            bh = int(self.k.size(self.batch[0]))
            return bh // self.batch_size if self.batch_size and bh % self.batch_size == 0 else bh
        return 1

    @property
    def q_len(self) -> int:
        return _hint(self.q.size("q"))

    @property
    def kv_len(self) -> int:
        return _hint(self.k.size("k"))

    @property
    def head_dim(self) -> int:
        return int(self.q.size("d"))

    @property
    def head_dim_v(self) -> int:
        return int(self.v.size("e"))

    @property
    def dtype(self) -> torch.dtype:
        return tensor_val(self.q.node).dtype

    @property
    def model_mask(self) -> M.Mask:
        """The structural part of the model's own mask (``full`` when there is none)."""
        return M.conj(M.Causal() if self.is_causal else None, *(t.structural for t in self.terms))

    @property
    def alibi(self) -> tuple[float, ...] | None:
        """Per-head ALiBi slopes of the terms proven ALiBi (summed: biases add), or None."""
        slopes = [t.alibi for t in self.terms if t.alibi is not None]
        if not slopes:
            return None
        return tuple(float(sum(col)) for col in zip(*slopes))

    @property
    def runtime_terms(self) -> list[MaskTerm]:
        return [t for t in self.terms if t.structural is None]

    @property
    def documents_term(self) -> MaskTerm | None:
        """The term proven a packed-documents mask (at most one, and only with no run-time term)."""
        return next((t for t in self.terms if t.documents is not None), None)

    @property
    def mask_kind(self) -> str | None:
        terms = self.runtime_terms
        if not terms:
            return "documents" if self.documents_term is not None else None
        return "bool" if all(t.kind != "additive" for t in terms) else "additive"

    @property
    def layout(self) -> str:
        names = {"q": "S", "d": "D"}
        if len(self.batch) == 2:
            names.update({self.batch[0]: "B", self.batch[1]: "H"})
        elif len(self.batch) == 1:
            names[self.batch[0]] = "BH"
        return "[" + ",".join(names.get(r, r) for r in self.q.roles) + "]"

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def describe(self) -> str:
        mask = str(self.model_mask) + (f" + runtime {self.mask_kind} mask" if self.mask_kind else "")
        return (
            f"{self.module or '<top>'} (layer {self.layer}): {self.source} q {self.layout} heads {self.num_heads} "
            f"kv {self.num_kv_heads} q_len {self.q_len} kv_len {self.kv_len} head_dim {self.head_dim} "
            f"{str(self.dtype).replace('torch.', '')} scale {self.scale:.6g}"
            + (f" softcap {self.softcap:g}" if self.softcap is not None else "")
            + (" alibi" if self.alibi is not None else "")
            + f" gqa {self.gqa} model mask {mask} "
            f"nodes {','.join(self.node_names)}"
        )


@dataclass
class Skipped:
    """An attention-like subgraph left untouched, with the reason."""

    nodes: list[str]
    module: str
    reason: str

    def describe(self) -> str:
        return f"{self.module or '<top>'}: {self.reason} (nodes {', '.join(self.nodes)})"


@dataclass
class DetectResult:
    sites: list[AttentionSite]
    skipped: list[Skipped]

    def summary(self) -> str:
        return "\n".join(
            [f"site {s.index}: {s.describe()}" for s in self.sites]
            + [f"skipped: {sk.describe()}" for sk in self.skipped]
        )


def _hint(x: int | torch.SymInt) -> int:
    """The size a graph was traced with (a symbolic size's hint; no guard is installed)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return int(x)


# -- module paths -------------------------------------------------------------------------------
_PREFIX = re.compile(r"^L\[['\"](?:self|args|kwargs|fn|mod|model|m)['\"]\](?:\[\d+\])?\.?")


def clean_module_path(path: str) -> str:
    """``L['args'][0].model.layers.0.self_attn`` / ``L['self']._modules['x']`` -> ``model.layers.0.self_attn``."""
    path = _PREFIX.sub("", path)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", "." + path).lstrip(".")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    # modules reached through the instance dict (``L['self'].__dict__['_modules']['blocks']``)
    path = re.sub(r"(^|\.)__dict__\._modules(?=\.|$)", "", path)
    return path.strip(".")


def module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return clean_module_path(str(path))


def layer_of(path: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


# -- operand look-through -----------------------------------------------------------------------
def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def look_through(node: fx.Node, roles: list[Role]) -> Operand:
    """Follow transposes/permutes/contiguous up to the tensor they reorder."""
    while isinstance(node, fx.Node):
        k = kind(node)
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            break
        n = len(roles)
        if k == "contiguous":
            node = src
        elif k == "mT":
            roles = roles[:-2] + [roles[-1], roles[-2]]
            node = src
        elif k == "transpose":
            dim0, dim1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
            if not (isinstance(dim0, int) and isinstance(dim1, int)):
                break
            a, b = _norm_dim(dim0, n), _norm_dim(dim1, n)
            roles = list(roles)
            roles[a], roles[b] = roles[b], roles[a]
            node = src
        elif k == "permute":
            dims = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = tuple(dims[0])
            if not all(isinstance(d, int) for d in dims) or len(dims) != n:
                break
            src_roles: list[Role] = [""] * n
            for i, d in enumerate(dims):
                src_roles[_norm_dim(d, n)] = roles[i]
            roles = src_roles
            node = src
        else:
            break
    return Operand(node, roles)


def strip_kv_repeat(op: Operand, head_role: Role) -> tuple[Operand, int]:
    """``(kv source, repeats)`` when ``op`` repeats kv heads along the head axis (GQA spelled as
    ``x[:, :, None].expand(...).reshape(...)``, ``unsqueeze``+``expand``+``reshape``/``flatten``,
    or ``repeat_interleave``); ``(op, 1)`` otherwise."""
    node = op.node
    ax = op.roles.index(head_role)
    k = kind(node)
    if k == "repeat_interleave":
        reps = arg(node, 1, "repeats")
        dim = arg(node, 2, "dim")
        src = node.args[0]
        if (
            isinstance(reps, int)
            and isinstance(dim, int)
            and isinstance(src, fx.Node)
            and _norm_dim(dim, len(op.roles)) == ax
        ):
            return Operand(src, op.roles), reps
        return op, 1
    if k not in ("reshape", "flatten"):
        return op, 1
    exp = node.args[0]
    if not (isinstance(exp, fx.Node) and kind(exp) == "expand"):
        return op, 1
    ins = exp.args[0]
    if not isinstance(ins, fx.Node):
        return op, 1
    five = maybe_tensor(exp)
    if five is None or five.dim() != len(op.roles) + 1:
        return op, 1
    src = None
    unsqueeze_dim = arg(ins, 1, "dim")
    if kind(ins) == "unsqueeze" and isinstance(unsqueeze_dim, int) and _norm_dim(unsqueeze_dim, five.dim()) == ax + 1:
        src = ins.args[0]
    elif kind(ins) == "getitem" and isinstance(ins.args[1], tuple):
        idx = ins.args[1]
        nones = [i for i, x in enumerate(idx) if x is None]
        plain = all(x is None or x == slice(None) or x is Ellipsis for x in idx)
        if plain and nones == [ax + 1] and Ellipsis not in idx[: ax + 1]:
            src = ins.args[0]
    if not isinstance(src, fx.Node):
        return op, 1
    s, out = maybe_tensor(src), maybe_tensor(node)
    reps = five.shape[ax + 1]
    if s is None or out is None or s.dim() != len(op.roles) or s.shape[ax] * reps != out.shape[ax]:
        return op, 1
    return Operand(src, op.roles), int(reps)


# -- products -----------------------------------------------------------------------------------
def _product(node: fx.Node) -> tuple[fx.Node, str, fx.Node, str, str] | None:
    """(A, labels, B, labels, out labels) of a matmul/bmm/einsum node, or None."""
    k = kind(node)
    if k == "matmul":
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return None
        va, vb = maybe_tensor(a), maybe_tensor(b)
        if va is None or vb is None or va.dim() != vb.dim() or va.dim() < 2:
            return None
        batch = "".join(chr(ord("A") + i) for i in range(va.dim() - 2))
        return a, batch + "mn", b, batch + "nr", batch + "mr"
    if k == "einsum":
        eq = node.args[0]
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if not isinstance(eq, str) or len(ops) != 2 or "..." in eq or "->" not in eq:
            return None
        lhs, out = eq.replace(" ", "").split("->")
        parts = lhs.split(",")
        x, y = ops
        if len(parts) != 2 or not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
            return None
        return x, parts[0], y, parts[1], out
    return None


def _roles_qk(la: str, lb: str, lo: str) -> tuple[dict[str, Role], list[Role]] | None:
    contracted = [c for c in la if c in lb and c not in lo]
    qs = [c for c in la if c in lo and c not in lb]
    ks = [c for c in lb if c in lo and c not in la]
    batch = [c for c in lo if c in la and c in lb]
    if len(contracted) != 1 or len(qs) != 1 or len(ks) != 1 or len(batch) + 2 != len(lo):
        return None
    if set(la) != set(batch) | {qs[0], contracted[0]} or set(lb) != set(batch) | {ks[0], contracted[0]}:
        return None
    if len(set(la)) != len(la) or len(set(lb)) != len(lb):
        return None
    names = {c: f"b{i}" for i, c in enumerate(batch)}
    names.update({qs[0]: "q", ks[0]: "k", contracted[0]: "d"})
    return names, [f"b{i}" for i in range(len(batch))]


def _scalar(x: object, g: nx.DiGraph) -> float | None:
    """A Python number, or a 0-d tensor computed from constants only."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node):
        v = val(x)
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            nodes = constant_subgraph(g, x)
            if nodes is not None:
                value = evaluate(nodes)
                return float(value) if isinstance(value, (torch.Tensor, int, float)) else None
    return None


@dataclass(frozen=True)
class RuntimeScale:
    """A softmax scale the model reads at run time: ``factor * tensor`` (``factor / tensor`` when
    ``divide``), ``tensor`` a 0-d graph value (a module's float attribute, which Dynamo passes as
    an input under dynamic shapes)."""

    tensor: fx.Node
    factor: float = 1.0
    divide: bool = False

    def times(self, c: float) -> RuntimeScale:
        return RuntimeScale(self.tensor, self.factor * c, self.divide)


def _runtime_scalar(x: object) -> RuntimeScale | None:
    """``x`` as a run-time scale: a 0-d tensor, or a Python number read from one (``.item()``)."""
    if not isinstance(x, fx.Node):
        return None
    if kind(x) == "item" and x.args and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    v = maybe_tensor(x)
    if v is None or v.dim() != 0 or not v.dtype.is_floating_point:
        return None
    return RuntimeScale(x)


# -- structural mask recovery -------------------------------------------------------------------
def _symbolic(nodes: list[fx.Node]) -> bool:
    """Whether any value in ``nodes`` has a symbolic size (the graph runs at other lengths too)."""
    for n in nodes:
        v = val(n)
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape):
            return True
    return False


def recover_structure(
    g: nx.DiGraph, term: MaskTerm, score_shape: tuple[int, ...], q_offset: int | None = 0, placing: bool = False
) -> tuple[M.Mask | None, str]:
    """Prove a mask term equal to full / causal / a sliding window over absolute positions (query
    row i at ``q_offset + i``) when it is a function of positions and sizes only, for every shape
    the graph will see. Returns (mask or None, explanation); None keeps it a run-time tensor.
    ``placing``: the offset is a guess to be confirmed, so only masks that read the query position
    (causal, a window) confirm it; ``full`` says nothing about where the queries are."""
    nodes = constant_subgraph(g, term.node)
    if nodes is None:
        return None, "depends on input data: kept as a runtime tensor"
    if _symbolic(nodes):
        return None, (
            "computed from symbolic sizes (the graph runs at other lengths): a structure proven at one "
            "length would not hold at the others, kept as a runtime tensor"
        )
    if q_offset is None:
        return None, "the queries' positions are known only at run time: kept as a runtime tensor"
    value = evaluate(nodes)
    if not isinstance(value, torch.Tensor):
        return None, "not a tensor"
    shape = tuple(_hint(s) for s in score_shape)
    try:
        t = value.expand(shape) if value.dim() <= len(shape) else None
    except RuntimeError:
        t = None
    if t is None:
        return None, f"mask of shape {tuple(value.shape)} does not broadcast to the scores {shape}"
    if term.kind == "allow":
        allowed = t.bool()
    elif term.kind == "disallow":
        allowed = ~t.bool()
    else:
        tf = t.float() * term.factor
        excluded = tf <= _EXCLUDE_BELOW
        if not bool(((tf == 0) | excluded).all()):
            return None, "additive mask with values other than 0 / -inf: kept as a runtime tensor"
        allowed = ~excluded
    sq, skv = shape[-2], shape[-1]
    flat = allowed.reshape(-1, sq, skv)
    pattern = flat[0]
    if not bool((flat == pattern).all()):
        return None, "differs across batch or heads: kept as a runtime tensor"
    if not bool(pattern.any(-1).all()):
        return None, "has query rows with no allowed key: kept as a runtime tensor"
    for cand in _candidates(pattern, q_offset):
        if placing and not cand.reads_query:
            continue
        if torch.equal(M.dense(cand, sq, skv, q_offset=q_offset)[0], pattern):
            return cand, f"proven {cand}" + (f" (queries at positions {q_offset}..)" if q_offset else "")
    return None, "positions-only mask that is not full / causal / a window: kept as a runtime tensor"


def recover_alibi(
    g: nx.DiGraph, term: MaskTerm, score_shape: tuple[int, ...], head_axis: int | None
) -> tuple[tuple[float, ...] | None, str]:
    """Prove an additive term an ALiBi bias, ``slope[h] * kv_pos + c[h, q]`` for every allowed
    pair (``c`` constant along each row: the softmax does not see it, so this is
    ``slope[h] * (kv_pos - q_pos)`` up to such a constant), when it reads no input data and the
    graph has static sizes. Returns (slopes per head, already times the term's factor, or None;
    explanation). A term that also excludes pairs is not taken (masks come as their own terms)."""
    nodes = constant_subgraph(g, term.node)
    if nodes is None or _symbolic(nodes) or term.kind != "additive":
        return None, ""
    if head_axis is None:
        return None, "a bias per head where the head axis is not visible: kept as a runtime tensor"
    value = evaluate(nodes)
    shape = tuple(_hint(s) for s in score_shape)
    if not isinstance(value, torch.Tensor) or value.dim() > len(shape):
        return None, ""
    try:
        t = value.double().expand(shape)
    except RuntimeError:
        return None, ""
    if not bool(torch.isfinite(t).all()) or bool((t <= _EXCLUDE_BELOW).any()):
        return None, ""
    sq, skv = shape[-2], shape[-1]
    t = t.movedim(head_axis, 0).reshape(shape[head_axis], -1, sq, skv)  # [H, rest, Sq, Skv]
    if not bool((t == t[:, :1]).all()):
        return None, "a bias that differs across the batch: kept as a runtime tensor"
    t = t[:, 0]  # [H, Sq, Skv]
    if skv < 2:
        return None, ""
    slopes = (t[:, 0, -1] - t[:, 0, 0]) / (skv - 1)  # [H] from the widest pair of the first row
    # what is left after the slope must be constant along every row, to the rounding of the
    # model's own (fp32) bias
    rest = t - slopes[:, None, None] * torch.arange(skv, dtype=t.dtype)
    spread = rest.amax(-1) - rest.amin(-1)
    tol = 8 * torch.finfo(torch.float32).eps * (1.0 + float(t.abs().max()))
    if float(spread.max()) > tol:
        return None, "an additive bias that is not linear in the key position per head: kept as a runtime tensor"
    fitted = tuple(float(torch.tensor(float(s), dtype=torch.float32)) * term.factor for s in slopes)
    return fitted, "proven an ALiBi bias, slopes " + ", ".join(f"{x:.6g}" for x in fitted)


def _document_probes(shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """Inputs a documents mask is checked on: packings restarting at 0 and elsewhere, one
    document, every token its own, repeated small ids, arbitrary and decreasing values."""
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    rows = int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1
    out = []
    for family in range(13):
        row_list = []
        for _ in range(rows):
            if family in (0, 1):
                cuts = torch.randperm(n, generator=g)[: max(1, n // 7)]
                starts = torch.zeros(n, dtype=torch.int64)
                starts[cuts] = 1
                starts[0] = 1
                doc = starts.cumsum(0) - 1
                first = torch.nonzero(starts).flatten()
                pos = torch.arange(n) - first[doc]
                row = pos + (torch.randint(0, 5, (1,), generator=g) * family)
            elif family == 2:
                row = torch.arange(n)
            elif family == 3:
                row = torch.arange(n) * 2
            elif family == 4:
                row = torch.randint(0, 3, (n,), generator=g)
            elif family == 5:
                row = torch.randint(0, n + 1, (n,), generator=g)
            elif family == 6:
                row = torch.zeros(n, dtype=torch.int64)
            elif family == 7:
                row = torch.arange(n, 0, -1)
            elif family == 8:
                row = -torch.randint(1, 4, (n,), generator=g)  # negative ids
            else:
                # values far apart that agree modulo 2**8, 2**16, 2**24, 2**32
                row = torch.randint(0, 3, (n,), generator=g) * (1 << (8 * (family - 8)))
            row_list.append(row)
        out.append(torch.stack(row_list).reshape(shape).to(dtype))
    return out


#: method / function names a documents mask may apply to its input's values on the way to the
#: mask: views and gathers (values moved, never changed), and device moves
_DOC_MOVES = {"expand", "reshape", "view", "unsqueeze", "squeeze", "contiguous", "clone", "permute", "transpose"}
_DOC_COMPARE = {"eq", "ne", "le", "ge", "lt", "gt"}
_DOC_AND = {"and_", "logical_and", "bitwise_and", "__and__", "__iand__"}


def _op_name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _documents_path_ok(g: nx.DiGraph, x: fx.Node, term: fx.Node) -> tuple[bool, str]:
    """Every operation between the input ``x`` and the mask ``term`` is one a same-document mask
    is built from: views and constant-index gathers of ``x`` (values moved, not changed), the
    packed-position rule (``diff`` with a ``prepend`` of ``x - 1``, ``!= 1``, ``cumsum``),
    comparisons of two values both read from ``x``, ``&`` of masks, and the bool -> 0 / -inf
    conversion. Anything that computes with the values (``%``, casts that narrow, comparisons
    with constants, ``|``) is refused, so the probes below decide among masks of this form only."""
    path = (nx.descendants(g, x) & nx.ancestors(g, term)) | {term}
    derived = path | {x}
    for n in path:
        name = _op_name(n)
        ins = [a for a in n.all_input_nodes if a in derived]
        if n.op not in ("call_function", "call_method"):
            return False, f"{n.name} is a {n.op}"
        if name == "getitem":
            idx = n.args[1] if len(n.args) > 1 else None
            flat = idx if isinstance(idx, (tuple, list)) else (idx,)
            if n.args[0] not in derived or any(isinstance(i, fx.Node) and i in derived for i in flat):
                return False, f"{n.name} indexes with values read from {x.name}"
            continue
        if name in _DOC_MOVES:
            continue
        if name in ("to", "type"):
            vin, vout = maybe_tensor(n.args[0]), maybe_tensor(n)
            if vin is None or vout is None or (vout.dtype != vin.dtype and vout.dtype != torch.int64):
                return False, f"{n.name} casts {x.name}'s values to {getattr(vout, 'dtype', '?')}"
            continue
        if name in ("sub", "add") and all(_op_name(u) == "diff" for u in n.users):
            continue  # the first position minus one, prepended to diff
        if name == "diff" or name == "cumsum":
            continue
        if name in _DOC_COMPARE:
            other = [a for a in n.args[:2] if not (isinstance(a, fx.Node) and a in derived)]
            if other:
                # only the packed-position rule compares with a constant: diff(...) != 1
                src = n.args[0]
                if not (name == "ne" and isinstance(src, fx.Node) and _op_name(src) == "diff" and n.args[1] == 1):
                    return False, f"{n.name} compares {x.name}'s values with {other[0]}"
            continue
        if name in _DOC_AND or name in ("logical_not", "invert", "__invert__"):
            continue
        if (
            name in ("where", "masked_fill")
            and len(ins) == 1
            and ins[0] is (n.args[0] if name == "where" else n.args[1])
        ):
            continue  # bool condition -> constant values
        return False, f"{n.name} ({name}) computes with {x.name}'s values"
    return True, ""


def recover_documents(
    g: nx.DiGraph, term: MaskTerm, score_shape: tuple[int, ...], roles: list[Role], batch: list[Role], q_offset: int
) -> tuple[tuple[Literal["ids", "positions"], fx.Node, M.Mask] | None, str]:
    """A bool term that is a function of one integer graph input ``x`` ``[.., Skv]`` and sizes, and
    equals (same document) & C, C full or causal, where the documents are ``x`` itself (``ids``)
    or those packed position ids ``x`` imply (``positions``, :func:`documents_of_positions`, as
    Hugging Face builds the mask of packed sequences). Checked by evaluating the term on probe
    inputs of thirteen families (:func:`_document_probes`) at the graph's static sizes: the term reads
    nothing else, so the documents are then read from ``x`` at run time. Returns ((kind, x, C) or
    None, explanation)."""
    if len(batch) != 2:
        return None, ""
    sources = input_sources(g, term.node)
    if not sources or len(sources) != 1:
        return None, ""
    (x,) = sources
    xv = maybe_tensor(x)
    kv_len = score_shape[roles.index("k")]
    q_len = score_shape[roles.index("q")]
    if xv is None or xv.dtype.is_floating_point or xv.dtype == torch.bool or xv.dim() == 0:
        return None, ""
    if any(isinstance(s, torch.SymInt) for s in xv.shape) or xv.shape[-1] != kv_len:
        return None, ""
    nodes = nx.ancestors(g, term.node) | {term.node}
    if _symbolic(list(nodes)):
        return None, ""
    ok, why = _documents_path_ok(g, x, term.node)
    if not ok:
        return None, ""
    shape = tuple(_hint(s) for s in score_shape)
    canon = [roles.index(r) for r in (*batch, "q", "k")]
    probes = _document_probes(tuple(int(s) for s in xv.shape), xv.dtype)
    values = []
    for probe in probes:
        try:
            v = evaluate_with(g, term.node, x, probe).expand(shape).permute(*canon)  # [B, H, Sq, Skv]
        except (RuntimeError, AttributeError, TypeError, IndexError):
            return None, ""
        if term.kind == "additive":
            # an additive mask is one only with values 0 / excluded (as eager attention's)
            vf = v.float() * term.factor
            excluded = vf <= _EXCLUDE_BELOW
            if not bool(((vf == 0) | excluded).all()):
                return None, ""
            t = ~excluded
        else:
            t = v.bool()
        values.append(~t if term.kind == "disallow" else t)
    qpos = torch.arange(q_len) + q_offset
    causal = qpos[:, None] >= torch.arange(kv_len)[None, :]
    for how in ("ids", "positions"):
        for cand, static in ((M.Full(), None), (M.Causal(), causal)):
            ok = True
            for probe, got in zip(probes, values):
                rows = probe.reshape(-1, kv_len).to(torch.int64)
                if rows.shape[0] not in (1, got.shape[0]):
                    ok = False
                    break
                docs = rows if how == "ids" else documents_of_positions(rows)
                want = same_document(docs, q_len, q_offset)  # [B, 1, Sq, Skv]
                if static is not None:
                    want = want & static
                if not torch.equal(got, want.expand_as(got)):
                    ok = False
                    break
            if ok:
                return (how, x, cand), f"proven {cand} within the documents of {x.name} ({how}, on 13 probe inputs)"
    return None, ""


def _candidates(pattern: torch.Tensor, q_offset: int) -> list[M.Mask]:
    sq, skv = pattern.shape
    q = torch.arange(sq).view(-1, 1) + q_offset
    kv = torch.arange(skv).view(1, -1)
    d = (q - kv).expand(sq, skv)
    before = int(d[pattern].max())
    after = int((-d)[pattern].max())
    out: list[M.Mask] = [M.Full(), M.Causal()]
    if after <= 0 and before >= 0:
        out.append(M.Window(before, 0))
    if before >= 0 and after >= 0:
        out.append(M.Window(before, after))
    return out


def _feeds_product(sm: fx.Node) -> bool:
    """The softmax's output reaches a matmul / einsum (through casts, dropout and reshapes):
    softmax(.) @ V."""
    frontier, seen = [sm], set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            k = kind(u)
            if k in ("matmul", "einsum"):
                return True
            if k in ("cast", "dropout", "reshape") and u not in seen:
                seen.add(u)
                frontier.append(u)
    return False


# -- detection ----------------------------------------------------------------------------------
class _Detector:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.g = to_networkx(gm.graph)
        self.sites: list[AttentionSite] = []
        self.skipped: list[Skipped] = []
        self.documents_seen: dict[tuple, tuple] = {}

    def run(self) -> DetectResult:
        for node in list(self.gm.graph.nodes):
            k = kind(node)
            if k not in ("sdpa", "softmax"):
                continue
            try:
                site = self._sdpa(node) if k == "sdpa" else self._explicit(node)
            except NotASite as e:
                # a softmax whose probabilities feed a product looks like attention however its
                # scores were computed: say why it was not taken
                if e.attention_like or (k == "softmax" and _feeds_product(node)):
                    self.skipped.append(Skipped([node.name], module_of(node), e.reason))
                continue
            self.sites.append(site)
        self._number_layers()
        return DetectResult(self.sites, self.skipped)

    def _number_layers(self) -> None:
        order = 0
        for s in self.sites:
            if not s.layer_from_path:
                s.layer = order
                order += 1

    def _new_site(self, **kw) -> AttentionSite:
        anchor = kw.pop("anchor")
        module = module_of(anchor)
        layer = layer_of(module)
        site = AttentionSite(
            index=len(self.sites),
            module=module,
            layer=layer if layer is not None else -1,
            layer_from_path=layer is not None,
            **kw,
        )
        self._split_batch(site)
        self._place_queries(site)
        self._recover_masks(site)
        return site

    def _place_queries(self, site: AttentionSite) -> None:
        """Where the queries sit among the keys (passes/positions.py). SDPA's ``is_causal`` is
        aligned top-left (key j <= query row i) by definition, which is the model's positions only
        when the first query sits at key 0: over a cache whose positions are given per call that is
        checked at run time; over keys the queries were appended to, the model's own attention
        is left as written."""
        q_len, kv_len = site.q.size("q"), site.k.size("k")
        pos = query_positions(site.k.node, site.k.roles.index("k"), q_len, kv_len, site.nodes[0])
        site.notes.append(f"query positions: {pos.kind} ({pos.why})")
        if site.is_causal and pos.kind == "end" and same_size(q_len, kv_len):
            # an empty cache: top-left and bottom-right agree
            pos = QueryPositions("start", pos.why + " (empty: as many queries as keys)")
        if site.is_causal and pos.kind == "end":
            raise NotASite(
                "is_causal over keys the queries were appended to: SDPA aligns it top-left (query i sees keys "
                "0..i), not at the queries' positions at the end of the keys; left as the model wrote it"
            )
        if site.is_causal and pos.kind == "given":
            # top-left causal needs the first query at key 0: kept as 'start', the op checks the positions
            pos = QueryPositions("start", pos.why + "; is_causal: the first position must be 0", pos.node)
        if site.is_causal and pos.kind == "unknown":
            # the model's own mask says where the queries are: SDPA's is_causal puts query i at key i
            pos = QueryPositions("start", "is_causal: the model puts query i at key i (SDPA's top-left alignment)")
        site.positions = pos

    def _split_batch(self, site: AttentionSite) -> None:
        """For [B*H, S, D] operands, find H from the reshape that merged batch and heads."""
        if len(site.batch) != 1:
            return
        bh = int(site.q.size(site.batch[0]))
        node: Any = site.q.node
        for _ in range(6):
            if not isinstance(node, fx.Node) or kind(node) not in (
                "reshape",
                "contiguous",
                "transpose",
                "permute",
                "flatten",
            ):
                break
            src = node.args[0]
            v = val(src) if isinstance(src, fx.Node) else None
            if kind(node) in ("reshape", "flatten") and isinstance(v, torch.Tensor) and v.dim() == 4:
                for h in (v.shape[1], v.shape[2]):
                    if int(v.shape[0]) * int(h) == bh:
                        site.split_heads = int(h)
                        return
            node = src
        site.heads_known = False
        site.notes.append(
            f"the head count of the [B*H, S, D] operands is not visible in the graph: treated as {bh} heads of batch 1"
        )

    def _recover_masks(self, site: AttentionSite) -> None:
        shape = [1] * len(site.score_roles)
        for i, r in enumerate(site.score_roles):
            if r == "q":
                shape[i] = site.q_len
            elif r == "k":
                shape[i] = site.kv_len
            else:
                shape[i] = max(_hint(site.q.size(r)), _hint(site.k.size(r)))
        # a structure is recovered over absolute positions, so the queries' offset must be known now
        offset = {"start": 0, "end": site.kv_len - site.q_len}.get(site.positions.kind)
        if site.positions.node is not None:
            offset = None
        for t in site.terms:
            if site.positions.kind == "unknown":
                # the model's own mask may say where the queries are: causal from the first or the last key
                for candidate in sorted({0, site.kv_len - site.q_len}):
                    t.structural, why = recover_structure(self.g, t, tuple(shape), candidate, placing=True)
                    if t.structural is not None:
                        site.positions = QueryPositions("start", f"the model's mask {t.node.name} is {why}")
                        site.q_offset = candidate
                        break
                if t.structural is not None:
                    offset = site.q_offset
                    site.notes.append(f"mask {t.node.name} ({t.kind}): {why}")
                    continue
            t.structural, why = recover_structure(self.g, t, tuple(shape), offset)
            if t.structural is None and t.kind == "additive":
                head_axis = site.score_roles.index(site.batch[1]) if len(site.batch) == 2 else None
                slopes, alibi_why = recover_alibi(self.g, t, tuple(shape), head_axis)
                if slopes is not None:
                    t.structural, t.alibi = M.Full(), slopes
                why = alibi_why or why
            if t.structural is None and offset is not None:
                # layers share the model's one mask: its probes run once per graph
                memo = (t.node, t.kind, t.factor, tuple(shape), tuple(site.score_roles), tuple(site.batch), offset)
                if memo not in self.documents_seen:
                    self.documents_seen[memo] = recover_documents(
                        self.g, t, tuple(shape), site.score_roles, site.batch, offset
                    )
                found, doc_why = self.documents_seen[memo]
                if found is not None:
                    t.documents, t.documents_source, t.structural = found
                    why = doc_why
            site.notes.append(f"mask {t.node.name} ({t.kind}): {why}")
        docs = [t for t in site.terms if t.documents is not None]
        if docs and (len(docs) > 1 or site.runtime_terms):
            # one documents term and no other run-time mask, else all run-time tensors as before
            for t in docs:
                t.documents, t.documents_source, t.structural = None, None, None
            site.notes.append("documents beside another run-time mask: kept as a runtime tensor")

    # -- F.scaled_dot_product_attention --------------------------------------------------------
    def _sdpa(self, node: fx.Node) -> AttentionSite:
        # diffusers' attention dispatch passes query/key/value by keyword
        q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
        mask = arg(node, 3, "attn_mask")
        dropout_p = arg(node, 4, "dropout_p", 0.0)
        is_causal = arg(node, 5, "is_causal", False)
        scale = arg(node, 6, "scale")
        enable_gqa = node.kwargs.get("enable_gqa", arg(node, 7, "enable_gqa", False))
        if dropout_p not in (0, 0.0):
            raise NotASite(
                f"scaled_dot_product_attention with dropout_p={dropout_p} samples a random mask at run "
                f"time; only dropout_p=0 (eval) is rewritten"
            )
        if not isinstance(is_causal, bool):
            raise NotASite(f"is_causal is not a compile-time constant ({is_causal})")
        vq = val(q)
        if not isinstance(vq, torch.Tensor) or vq.dim() not in (3, 4):
            raise NotASite("scaled_dot_product_attention on tensors that are not 3-D or 4-D")
        nb = vq.dim() - 2
        batch = [f"b{i}" for i in range(nb)]
        qo, ko, vo = Operand(q, batch + ["q", "d"]), Operand(k, batch + ["k", "d"]), Operand(v, batch + ["k", "e"])
        if scale is None:
            scale = 1.0 / math.sqrt(vq.shape[-1])
        scale_v = _scalar(scale, self.g)
        runtime_scale = None if scale_v is not None else _runtime_scalar(scale)
        if scale_v is None and runtime_scale is None:
            raise NotASite(f"scale {scale} is neither a compile-time constant nor a run-time scalar")
        if scale_v is None:
            scale_v = 1.0 / math.sqrt(vq.shape[-1])
        terms = []
        if isinstance(mask, fx.Node):
            mv = maybe_tensor(mask)
            if mv is None:
                raise NotASite(f"attn_mask {mask.name} has no tensor value")
            if mv.requires_grad:
                raise NotASite("the attention mask requires grad; attncc treats masks as constants")
            terms.append(MaskTerm(mask, "allow" if mv.dtype == torch.bool else "additive"))
        elif mask is not None:
            raise NotASite(f"attn_mask {mask!r} is not a tensor")
        gqa = "enable_gqa" if enable_gqa and tensor_val(k).shape[1] != vq.shape[1] else "none"
        if nb == 2 and gqa == "none":
            ks, rk = strip_kv_repeat(ko, "b1")
            vs, rv = strip_kv_repeat(vo, "b1")
            if rk > 1 and rk == rv:
                ko, vo, gqa = ks, vs, "repeat"
        site = self._new_site(
            anchor=node,
            source="sdpa",
            q=qo,
            k=ko,
            v=vo,
            out=node,
            out_roles=batch + ["q", "e"],
            score_roles=batch + ["q", "k"],
            batch=batch,
            scale=scale_v,
            runtime_scale=runtime_scale,
            terms=terms,
            nodes=[node],
            gqa=gqa,
            is_causal=is_causal,
        )
        return site

    # -- softmax(QK^T * scale + mask) V --------------------------------------------------------
    def _explicit(self, sm: fx.Node) -> AttentionSite:
        qk, chain, ops = self._scores_to_product(sm)
        prod = _product(qk)
        if prod is None:
            raise NotASite(f"{qk.name} is not a two-operand matmul/einsum", attention_like=False)
        a, la, b, lb, lo = prod
        roles = _roles_qk(la, lb, lo)
        if roles is None:
            raise NotASite(f"{qk.name} is not a QK^T product (operand labels {la},{lb}->{lo})", attention_like=False)
        names, batch = roles
        score_roles = [names[c] for c in lo]
        if score_roles[-1] != "k":
            raise NotASite(f"softmax over the query axis of {qk.name}, not the key axis", attention_like=False)
        qo = look_through(a, [names[c] for c in la])
        ko = look_through(b, [names[c] for c in lb])
        post, p, pv = self._probabilities_to_product(sm)
        vo, oroles = self._values(pv, p, score_roles, batch)
        # the site subgraph must be convex: only the output leaves it
        internal = set([qk, sm, pv] + chain + post)
        leaks = escaping_nodes(self.g, internal, pv)
        if leaks:
            n, u = leaks[0]
            raise NotASite(
                f"intermediate {n.name} of the attention is also used by {u.name}; rewriting would "
                f"change what {u.name} sees"
            )
        scale, runtime_scale, terms, softcap = self._scale_and_terms(ops, qk)
        if runtime_scale is not None:
            scale = runtime_scale.factor / math.sqrt(self._head_dim(qo))
        gqa = "none"
        if len(batch) == 2:
            ks, rk = strip_kv_repeat(ko, "b1")
            vs, rv = strip_kv_repeat(vo, "b1")
            if rk > 1 and rk == rv:
                ko, vo, gqa = ks, vs, "repeat"
        return self._new_site(
            anchor=sm,
            source="explicit",
            q=qo,
            k=ko,
            v=vo,
            out=pv,
            out_roles=oroles,
            score_roles=score_roles,
            batch=batch,
            scale=scale,
            runtime_scale=runtime_scale,
            terms=terms,
            softcap=softcap,
            nodes=[qk] + chain[::-1] + [sm] + post + [pv],
            gqa=gqa,
        )

    @staticmethod
    def _head_dim(q: Operand) -> int:
        return int(q.size("d"))

    def _scores_to_product(self, sm: fx.Node) -> tuple[fx.Node, list[fx.Node], list[tuple]]:
        """From a softmax over the last dim back to the QK product: (product, the score ops between
        them, the scale and mask operations they apply, innermost last)."""
        x = sm.args[0]
        vx = maybe_tensor(x)
        if not isinstance(x, fx.Node) or vx is None:
            raise NotASite("softmax of a non-tensor", attention_like=False)
        dim = arg(sm, 1, "dim")
        if not isinstance(dim, int) or _norm_dim(dim, vx.dim()) != vx.dim() - 1:
            raise NotASite(f"softmax over dim {dim}, not the last", attention_like=False)
        chain: list[fx.Node] = []
        ops: list[tuple] = []
        cur = x
        while kind(cur) not in ("matmul", "einsum"):
            nxt = self._score_step(cur, kind(cur), ops)
            if nxt is None:
                op = getattr(cur.target, "__name__", str(cur.target)) if isinstance(cur, fx.Node) else repr(cur)
                near = [cur, *cur.all_input_nodes] if isinstance(cur, fx.Node) else []
                capped = any("tanh" in str(getattr(n.target, "__name__", n.target)) for n in near)
                why = " (score soft-capping is read only as tanh(s / c) * c, c a constant)" if capped else ""
                raise NotASite(
                    f"softmax input is not a QK product (stopped at {getattr(cur, 'name', cur)}: {op}){why}",
                    attention_like=False,
                )
            chain.append(cur)
            cur = nxt
        return cur, chain, ops

    def _probabilities_to_product(self, sm: fx.Node) -> tuple[list[fx.Node], fx.Node, fx.Node]:
        """The probabilities' path: softmax -> casts -> P @ V, with no other use; returns (casts,
        the node P @ V multiplies, the P @ V product)."""
        post: list[fx.Node] = []
        p = sm
        while True:
            users = list(p.users)
            if len(users) != 1:
                raise NotASite(
                    f"attention probabilities {p.name} are used {len(users)} times "
                    f"({', '.join(u.name for u in users)}); only softmax(QK)V with the probabilities "
                    f"unused elsewhere is rewritten"
                )
            u = users[0]
            ku = kind(u)
            if ku == "cast":
                post.append(u)
                p = u
                continue
            if ku == "dropout":
                raise NotASite(
                    f"dropout {u.name} on the attention probabilities is in training mode (random at run "
                    f"time); call model.eval() to rewrite this site"
                )
            if ku in ("matmul", "einsum"):
                return post, p, u
            raise NotASite(f"softmax output {p.name} feeds {u.name} ({u.target}), not a product with values")

    def _values(
        self, pv: fx.Node, p: fx.Node, score_roles: list[Role], batch: list[Role]
    ) -> tuple[Operand, list[Role]]:
        """The value operand of ``pv = P @ V`` and the roles of its output dims."""
        pprod = _product(pv)
        if pprod is None:
            raise NotASite(f"{pv.name} is not a two-operand product")
        pa, lpa, pb, lpb, lpo = pprod
        if pa is p:
            lp, vnode, lv = lpa, pb, lpb
        elif pb is p:
            lp, vnode, lv = lpb, pa, lpa
        else:
            raise NotASite(f"{pv.name} does not multiply the probabilities")
        if len(lp) != len(score_roles):
            raise NotASite(f"{pv.name}: probabilities of rank {len(lp)} for scores of rank {len(score_roles)}")
        rename = {c: score_roles[i] for i, c in enumerate(lp)}
        extra = [c for c in lv if c not in rename]
        if len(extra) != 1:
            raise NotASite(f"{pv.name} is not a P @ V product (labels {lp},{lv}->{lpo})")
        rename[extra[0]] = "e"
        vroles = [rename[c] for c in lv]
        oroles = [rename.get(c, "?") for c in lpo]
        if sorted(vroles) != sorted(batch + ["k", "e"]) or sorted(oroles) != sorted(batch + ["q", "e"]):
            raise NotASite(f"{pv.name} is not a P @ V product over the key axis (labels {lp},{lv}->{lpo})")
        return look_through(vnode, vroles), oroles

    def _scale_and_terms(
        self, ops: list[tuple], qk: fx.Node
    ) -> tuple[float, RuntimeScale | None, list[MaskTerm], float | None]:
        """The product of the score scales (constant, and at most one read at run time), the mask
        terms in score units (a term added before a scale is scaled with the scores) and the
        soft-capping: ``post * tanh(pre * qk)`` is ``cap * tanh(scale * qk / cap)`` with
        ``cap = post`` and ``scale = pre * post`` (None: no tanh)."""
        scale = 1.0
        runtime: RuntimeScale | None = None
        terms: list[MaskTerm] = []
        pre: float | None = None
        shifted = False
        for op in reversed(ops):
            if op[0] == "constant":
                shifted = shifted or pre is None
                continue
            if op[0] == "tanh":
                if shifted:
                    raise NotASite(
                        "a constant is added to the scores inside tanh: soft-capping is read only as "
                        "cap * tanh(scale * q.k / cap)"
                    )
                if pre is not None:
                    raise NotASite("the scores pass through tanh twice; only one soft-capping is read")
                if runtime is not None or terms:
                    raise NotASite(
                        "tanh of scores that carry a mask or a run-time scale: soft-capping is read only "
                        "as cap * tanh(scale * q.k / cap) with constants, before the mask"
                    )
                if scale <= 0:
                    raise NotASite(f"tanh of scores scaled by {scale:g}: a soft-capping needs a positive scale")
                pre, scale = scale, 1.0
            elif op[0] == "scale":
                scale *= op[1]
                for t in terms:
                    t.factor *= op[1]
            elif op[0] == "runtime_scale":
                if runtime is not None or terms:
                    raise NotASite(
                        "a run-time scale that multiplies a mask or another run-time scale: only one "
                        "run-time scale of the scores themselves is supported"
                    )
                runtime = op[1]
            elif op[0] == "term":
                t = op[1]
                if depends_on(self.g, t.node, {qk}):
                    raise NotASite(
                        f"mask {t.node.name} is computed from the scores themselves (data-dependent selection)"
                    )
                if getattr(val(t.node), "requires_grad", False):
                    raise NotASite(f"mask {t.node.name} requires grad; attncc treats masks as constants")
                terms.append(t)
        for t in terms:
            # a fill is a mask only where it is still far below the scores after the scales
            if t.fill is not None and t.fill * t.factor > _EXCLUDE_BELOW:
                raise NotASite(
                    f"{t.node.name} fills masked scores with {t.fill:g}, scaled to {t.fill * t.factor:g} before "
                    f"the softmax; only -inf or a very negative value (<= {_EXCLUDE_BELOW:g}) is a mask"
                )
        softcap: float | None = None
        if pre is not None:
            if runtime is not None:
                raise NotASite("a run-time scale after a soft-capping is not read")
            if scale <= 0:
                raise NotASite(f"tanh(s) times {scale:g}: a soft-capping multiplies by a positive cap")
            softcap, scale = scale, pre * scale
        if runtime is not None:
            runtime = runtime.times(scale)
        elif scale <= 0:
            raise NotASite(f"scale {scale} is not positive")
        return scale, runtime, terms, softcap

    def _score_step(self, cur: fx.Node, k: str | None, ops: list[tuple]) -> fx.Node | None:
        """One step from the scores towards QK: records scale/mask ops, returns the next node."""
        args = cur.args
        if k == "cast":
            return args[0] if isinstance(args[0], fx.Node) else None
        if k == "tanh":
            # soft-capping: cap * tanh(s / cap), read with the scales around it
            if len(args) != 1 or cur.kwargs or not isinstance(args[0], fx.Node):
                return None
            ops.append(("tanh",))
            return args[0]
        if k in ("mul", "div"):
            if k == "div" and (cur.kwargs.get("rounding_mode") is not None or len(args) > 2):
                return None  # a rounding division is not a scale
            a, b = args[0], args[1] if len(args) > 1 else cur.kwargs.get("other")
            for chain_side, other in ((a, b), (b, a)):
                if isinstance(chain_side, fx.Node) and self._reaches_product(chain_side):
                    if k == "div" and chain_side is b:
                        return None
                    c = _scalar(other, self.g)
                    if c is not None:
                        ops.append(("scale", c if k == "mul" else 1.0 / c))
                        return chain_side
                    runtime = _runtime_scalar(other)
                    if runtime is None:
                        raise NotASite(
                            f"{cur.name} scales the scores by {other}, neither a compile-time constant "
                            "nor a run-time scalar"
                        )
                    ops.append(("runtime_scale", RuntimeScale(runtime.tensor, 1.0, k == "div")))
                    return chain_side
            return None
        if k == "add":
            a, b = args[0], args[1] if len(args) > 1 else cur.kwargs.get("other")
            if arg(cur, 2, "alpha", 1) != 1:
                return None
            for chain_side, other in ((a, b), (b, a)):
                if isinstance(chain_side, fx.Node) and self._reaches_product(chain_side):
                    constant = None if isinstance(other, fx.Node) else _scalar(other, self.g)
                    if isinstance(other, fx.Node):
                        ops.append(("term", MaskTerm(other, "additive")))
                    elif constant is None:
                        return None
                    elif constant != 0:
                        # adding a constant to every score does not change softmax (but it would
                        # move scores inside a soft-capping: recorded, refused there)
                        ops.append(("constant",))
                    return chain_side
            return None
        if k == "masked_fill":
            src, cond, value = args[0], arg(cur, 1, "mask"), arg(cur, 2, "value")
            fill = _scalar(value, self.g)
            if not isinstance(src, fx.Node) or not isinstance(cond, fx.Node):
                return None
            if fill is None or fill > _EXCLUDE_BELOW:
                raise NotASite(
                    f"{cur.name} fills masked scores with {value}; only -inf or a very negative value "
                    f"(<= {_EXCLUDE_BELOW:g}) is a mask"
                )
            ops.append(("term", MaskTerm(cond, "disallow", fill=fill)))
            return src
        if k == "where":
            cond, a, b = args[0], args[1], args[2]
            if not isinstance(cond, fx.Node):
                return None
            sides: tuple[tuple[fx.node.Argument, fx.node.Argument, TermKind], ...] = (
                (a, b, "allow"),
                (b, a, "disallow"),
            )
            for chain_side, other, kind_ in sides:
                if isinstance(chain_side, fx.Node) and self._reaches_product(chain_side):
                    fill = _scalar(other, self.g)
                    if fill is None or fill > _EXCLUDE_BELOW:
                        raise NotASite(
                            f"{cur.name} replaces scores with {other}; only -inf or a very negative value is a mask"
                        )
                    ops.append(("term", MaskTerm(cond, kind_, fill=fill)))
                    return chain_side
            return None
        return None

    def _reaches_product(self, node: fx.Node, depth: int = 12) -> bool:
        cur = node
        for _ in range(depth):
            k = kind(cur)
            if k in ("matmul", "einsum"):
                return True
            if k not in ("cast", "mul", "div", "add", "masked_fill", "where", "tanh"):
                return False
            nxt = (
                [
                    a
                    for a in (cur.args[:1] if k in ("cast", "masked_fill", "tanh") else cur.args)
                    if isinstance(a, fx.Node) and self._reaches_product(a, depth - 1)
                ]
                if depth > 1
                else []
            )
            return bool(nxt)
        return False


def detect(gm: fx.GraphModule) -> DetectResult:
    """Find every attention site in ``gm`` (the graph is not modified)."""
    return _Detector(gm).run()


@dataclass(frozen=True)
class Detect:
    """Find every attention site in canonical roles, with the model's own mask recovered."""

    name: ClassVar[str] = "detect"

    def __call__(self, gm: fx.GraphModule) -> DetectResult:
        return detect(gm)
