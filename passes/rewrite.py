"""rewrite: each bound site's subgraph becomes one call of ``attncc::attention``."""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

import attncc.runtime.ops  # noqa: F401  (registers torch.ops.attncc.attention)
from attncc.ir.documents import documents_of_positions
from attncc.ir.plan import AttentionPlan
from attncc.passes.bind import BoundSite
from attncc.passes.detect import AttentionSite, MaskTerm, Operand
from attncc.passes.graph import commit, tensor_val, val
from attncc.runtime import registry


@dataclass
class RewrittenSite:
    """A bound site replaced by ``call`` (an ``attncc::attention`` node; the thread-selections pass
    may re-target it to a selection variant) with its plan registered under ``plan_key``."""

    bound: BoundSite
    plan_key: str
    call: fx.Node

    @property
    def site(self) -> AttentionSite:
        return self.bound.site

    @property
    def plan(self) -> AttentionPlan:
        return self.bound.plan


@dataclass
class RewriteResult:
    rewritten: list[RewrittenSite]

    def summary(self) -> str:
        return f"rewrote {len(self.rewritten)} sites into attncc::attention"


class _Emitter:
    def __init__(self, graph: fx.Graph, site: AttentionSite, replaced: dict[fx.Node, fx.Node]):
        # ``replaced``: outputs of sites rewritten before this one -> the nodes that took their place
        # (a site may read another's output directly)
        self.graph, self.site, self.replaced = graph, site, replaced
        self.meta = {
            k: site.out.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in site.out.meta
        }

    def method(self, name: str, *args) -> fx.Node:
        node = self.graph.call_method(name, args)
        node.meta.update(self.meta)
        _record_value(node, lambda t, *rest: getattr(t, name)(*rest), args)
        return node

    def function(self, fn, *args) -> fx.Node:
        node = self.graph.call_function(fn, args)
        node.meta.update(self.meta)
        _record_value(node, fn, args)
        return node

    def to_bhsd(self, node: fx.Node, roles: list[str], order: list[str], split: tuple[int, int]) -> fx.Node:
        """Permute ``node`` (dims named ``roles``) to ``order`` and make the batch part ``[B, H]``
        (``split`` is how a merged ``[B*H]`` dim unflattens)."""
        perm = [roles.index(r) for r in order]
        if perm != list(range(len(perm))):
            node = self.method("permute", node, *perm)
        nb = len(self.site.batch)
        if nb == 1:
            node = self.method("unflatten", node, 0, split)
        elif nb == 0:
            node = self.method("unsqueeze", self.method("unsqueeze", node, 0), 0)
        return node

    def operand(self, op: Operand, seq: str, dim: str, kv: bool) -> fx.Node:
        site = self.site
        # [B*Hkv] splits with the query's batch size, [B*H] with the head count
        split = (site.batch_size, -1) if kv else (-1, site.num_heads)
        return self.to_bhsd(self.replaced.get(op.node, op.node), op.roles, site.batch + [seq, dim], split)

    def scale(self) -> fx.Node | None:
        """The run-time scale as a 0-d tensor node, or None when the plan's scale is a constant."""
        r = self.site.runtime_scale
        if r is None:
            return None
        if r.divide:
            return self.function(operator.truediv, r.factor, r.tensor)
        return self.function(operator.mul, r.tensor, r.factor)

    def mask(self, terms: list[MaskTerm]) -> fx.Node | None:
        site = self.site
        n = len(site.score_roles)
        canon = site.batch + ["q", "k"]
        allowed: fx.Node | None = None
        additive: fx.Node | None = None
        for t in terms:
            m = self.replaced.get(t.node, t.node)
            nd = tensor_val(m).dim()
            for _ in range(n - nd):
                m = self.method("unsqueeze", m, 0)
            m = self.to_bhsd_mask(m, site.score_roles, canon)
            if t.kind == "additive":
                if t.factor != 1.0:
                    m = self.function(operator.mul, m, t.factor)
                additive = m if additive is None else self.function(operator.add, additive, m)
            else:
                if tensor_val(t.node).dtype != torch.bool:
                    m = self.method("bool", m)
                if t.kind == "disallow":
                    m = self.function(torch.logical_not, m)
                allowed = m if allowed is None else self.function(torch.logical_and, allowed, m)
        if additive is None:
            return allowed
        if allowed is not None:
            additive = self.method("masked_fill", additive, self.function(torch.logical_not, allowed), float("-inf"))
        return additive

    def documents(self, term: MaskTerm) -> fx.Node:
        """The document ids ``[B or 1, Skv]`` of a documents term, from its graph input."""
        assert term.documents_source is not None
        ids = self.method("reshape", term.documents_source, -1, self.site.k.size("k"))
        if term.documents == "positions":
            ids = self.function(documents_of_positions, ids)
        return ids

    def to_bhsd_mask(self, m: fx.Node, roles: list[str], order: list[str]) -> fx.Node:
        perm = [roles.index(r) for r in order]
        if perm != list(range(len(perm))):
            m = self.method("permute", m, *perm)
        nb = len(self.site.batch)
        if nb == 1:
            if _first_dim_after(m) == 1:
                m = self.method("unsqueeze", m, 0)
            else:
                m = self.method("unflatten", m, 0, (self.site.batch_size, -1))
        elif nb == 0:
            m = self.method("unsqueeze", self.method("unsqueeze", m, 0), 0)
        return m


def _record_value(node: fx.Node, fn, args: tuple) -> None:
    """Give an emitted node the fake ``example_value`` Dynamo gives its own nodes. Inductor's
    AOTAutograd cache refuses a graph whose method calls lack it, and a refused graph is retraced
    and recompiled on every compile. Metadata only: when it cannot be computed (a graph built
    without fake values), the node is left without it and the graph is simply not cached."""
    if any(val(a) is None for a in node.all_input_nodes):
        return
    vals = fx.node.map_arg(args, val)
    fakes = [v for v in vals if isinstance(v, FakeTensor)]
    # no fake tensor among the arguments: getitem on the op's (fake) result tuple
    mode = fakes[0].fake_mode if fakes else contextlib.nullcontext()
    try:
        with mode:
            node.meta["example_value"] = fn(*vals)
    except Exception:  # noqa: BLE001 - see the docstring: falling back is only a cache miss
        return


def _first_dim_after(node: fx.Node) -> int | None:
    """Size of dim 0 of a freshly emitted mask node (tracked through unsqueeze/permute to the
    node whose value is known); None when it is symbolic or unknown."""
    chain = []
    cur = node
    while cur.op == "call_method" and cur.target in ("unsqueeze", "permute") and isinstance(cur.args[0], fx.Node):
        chain.append(cur)
        cur = cur.args[0]
    v = val(cur)
    if not isinstance(v, torch.Tensor):
        return None
    shape = list(v.shape)
    for c in reversed(chain):
        dims = [d for d in c.args[1:] if isinstance(d, int)]
        if c.target == "unsqueeze":
            shape.insert(dims[0], 1)
        else:
            shape = [shape[i] for i in dims]
    return int(shape[0]) if shape and not isinstance(shape[0], torch.SymInt) else None


def rewrite_site(
    gm: fx.GraphModule, bound: BoundSite, executor: str, replaced: dict[fx.Node, fx.Node] | None = None
) -> RewrittenSite:
    """Replace one bound site's subgraph by an ``attncc::attention`` call and the layout ops around
    it; ``replaced`` maps the outputs of sites already rewritten to their replacements (and gets
    this site's)."""
    graph, site = gm.graph, bound.site
    replaced = {} if replaced is None else replaced
    plan_key = registry.register_plan(bound.plan)
    em = _Emitter(graph, site, replaced)
    with graph.inserting_before(site.out):
        q = em.operand(site.q, "q", "d", kv=False)
        k = em.operand(site.k, "k", "d", kv=True)
        v = em.operand(site.v, "k", "e", kv=True)
        if len(site.batch) == 2:
            b_role = site.batch[0]
            if site.k.size(b_role) == 1 and site.q.size(b_role) != 1:
                k = em.method("expand", k, site.q.size(b_role), -1, -1, -1)
                v = em.method("expand", v, site.q.size(b_role), -1, -1, -1)
        docs = site.documents_term
        mask = em.documents(docs) if site.mask_kind == "documents" and docs is not None else em.mask(site.runtime_terms)
        positions, scale = site.positions.node, em.scale()
        call = em.function(torch.ops.attncc.attention.default, q, k, v, mask, positions, scale, plan_key, executor)
        out = em.function(operator.getitem, call, 0)
        canon = site.batch + ["q", "e"]
        nb = len(site.batch)
        if nb == 1:
            out = em.method("flatten", out, 0, 1)
        elif nb == 0:
            out = em.method("squeeze", em.method("squeeze", out, 0), 0)
        perm = [canon.index(r) for r in site.out_roles]
        if perm != list(range(len(perm))):
            out = em.method("permute", out, *perm)
        want = val(site.out)
        if isinstance(want, torch.Tensor) and want.dtype != site.dtype:
            out = em.method("to", out, want.dtype)
    site.out.replace_all_uses_with(out)
    replaced[site.out] = out
    _erase_dead(graph, site)
    return RewrittenSite(bound, plan_key, call)


def _erase_dead(graph: fx.Graph, site: AttentionSite) -> None:
    """Remove the site's old nodes and whatever only they used (mask building, repeated KV)."""
    changed = True
    candidates = set(site.nodes) | {t.node for t in site.terms}
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in candidates and not node.users and node.op not in ("placeholder", "output"):
                candidates.update(node.all_input_nodes)
                graph.erase_node(node)
                changed = True


def rewrite(gm: fx.GraphModule, bound: list[BoundSite], executor: str) -> RewriteResult:
    """Replace every bound site; returns the rewritten ones."""
    replaced: dict[fx.Node, fx.Node] = {}
    done = [rewrite_site(gm, b, executor, replaced) for b in bound]
    if done:
        commit(gm)
    return RewriteResult(done)


@dataclass(frozen=True)
class Rewrite:
    """Each bound site's subgraph -> one ``attncc::attention`` call running on ``executor``."""

    name: ClassVar[str] = "rewrite"
    executor: str

    def __call__(self, gm: fx.GraphModule, bound: list[BoundSite]) -> RewriteResult:
        return rewrite(gm, bound, self.executor)
