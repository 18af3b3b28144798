"""FX graph helpers the passes share: node values and arguments, and analyses with networkx
(dependence, convexity, constant subgraphs)."""

from __future__ import annotations

import networkx as nx
import torch
from torch import fx


def val(node: object) -> object:
    """The example value (FakeTensor, SymInt or Python value) recorded on an FX node; a
    non-node argument is its own value."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def tensor_val(node: object) -> torch.Tensor:
    """The example tensor of ``node``; TypeError when its value is not a tensor."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{getattr(node, 'name', node)} has no tensor value (got {type(v).__name__})")
    return v


def maybe_tensor(node: object) -> torch.Tensor | None:
    """The example tensor of ``node``, or None when its value is not a tensor."""
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def commit(gm: fx.GraphModule) -> None:
    """Verify a changed graph and regenerate its code."""
    gm.graph.lint()
    gm.recompile()


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Positional-or-keyword argument ``name`` at ``index``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow DiGraph over FX nodes (edge producer -> user)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def escaping_nodes(g: nx.DiGraph, internal: set[fx.Node], output: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """Edges (inside -> outside) that leave ``internal`` anywhere but from ``output``: an empty list
    means the subgraph is convex with one exit, so it can be replaced as a unit."""
    return [(n, u) for n in internal if n is not output for u in g.successors(n) if u not in internal]


def depends_on(g: nx.DiGraph, node: fx.Node, sources: set[fx.Node]) -> bool:
    """True when ``node`` is computed from any of ``sources``."""
    return bool(nx.ancestors(g, node) & sources)


def _is_symbolic_scalar(v: object) -> bool:
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _hint(v: object) -> object:
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return v.node.hint
    return v


def constant_subgraph(g: nx.DiGraph, node: fx.Node) -> list[fx.Node] | None:
    """The nodes ``node`` is computed from (itself included, in graph order) when none of them
    reads tensor data from a graph input: a function of shapes and constants only. None otherwise."""
    nodes = nx.ancestors(g, node) | {node}
    for n in nodes:
        if n.op == "placeholder" and not _is_symbolic_scalar(val(n)):
            return None
        if n.op in ("call_module", "get_attr"):
            return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def evaluate(nodes: list[fx.Node]) -> object:
    """Run a constant subgraph (from :func:`constant_subgraph`) on real tensors; symbolic sizes
    take their hint (the size this graph was traced with). Returns the last node's value."""
    return _run(nodes, nodes[-1], {})


def _run(nodes: list[fx.Node], output: fx.Node, given: dict[fx.Node, object]) -> object:
    """Copy ``nodes`` (in graph order) into a graph of their own and run it on real tensors:
    placeholders take ``given`` values, else their hints; returns ``output``'s value."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = []
    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            inputs.append(given[n] if n in given else _hint(val(n)))
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[output])
    with unset_fake_temporarily(), torch.no_grad():
        return fx.GraphModule(torch.nn.Module(), graph)(*inputs)


def input_sources(g: nx.DiGraph, node: fx.Node) -> list[fx.Node] | None:
    """The graph inputs holding tensor data that ``node`` is computed from (placeholders, in graph
    order); None when it also reads module state (``get_attr`` / ``call_module``)."""
    nodes = nx.ancestors(g, node) | {node}
    if any(n.op in ("call_module", "get_attr") for n in nodes):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    inputs = [n for n in nodes if n.op == "placeholder" and not _is_symbolic_scalar(val(n))]
    return sorted(inputs, key=order.__getitem__)


def evaluate_with(g: nx.DiGraph, node: fx.Node, source: fx.Node, value: torch.Tensor) -> object:
    """Run the subgraph computing ``node`` with the graph input ``source`` replaced by ``value``
    (it must be the only tensor input ``node`` reads; symbolic sizes take their hints)."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    nodes = sorted(nx.ancestors(g, node) | {node}, key=order.__getitem__)
    return _run(nodes, node, {source: value})
