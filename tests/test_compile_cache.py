"""The rewritten graph stays acceptable to inductor's AOTAutograd cache (otherwise every compile
re-traces and recompiles the whole graph): each emitted node carries a fake example value."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from support import tiny_llama
from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_node_safe

from attncc.backend import Options, run_pipeline

SPEC = {"attncc": 1, "name": "cache", "block_size": 16, "rules": [{"mask": {"window": 24}}]}


def _rewritten_graph(spec: dict):
    captured = []

    def backend(gm, example_inputs):
        run_pipeline(gm, Options.parse({"spec": spec, "inner": "eager", "executor": "reference"}), count=False)
        captured.append(gm)
        return gm.forward

    model = tiny_llama(hidden_size=32, intermediate_size=64, vocab_size=50, max_position_embeddings=64)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 50, (1, 37)))
    assert len(captured) == 1
    return captured[0]


def test_rewritten_llama_graph_is_cacheable():
    gm = _rewritten_graph(SPEC)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.attncc.attention.default]
    assert len(calls) == 2
    for node in gm.graph.nodes:
        check_node_safe(node)  # raises BypassAOTAutogradCache on a node the cache refuses


def test_node_without_example_value_is_refused():
    # the check above can fail: a method call on an emitted node with no example value is refused
    gm = _rewritten_graph(SPEC)
    call = next(n for n in gm.graph.nodes if n.target is torch.ops.attncc.attention.default)
    out = next(iter(call.users))
    out.meta.pop("example_value")
    user = next(u for u in out.users if u.op == "call_method")
    with pytest.raises(BypassAOTAutogradCache):
        check_node_safe(user)
