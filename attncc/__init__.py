"""attncc: a compiler for sparse attention.

``torch.compile(model, backend="attncc", options={"spec": "my.yaml"})`` finds every
attention in the traced graph, binds it to a policy from the YAML spec and replaces it
with a fused kernel generated for that pattern; ``attncc.apply(model, spec=...)`` does the
same for a transformers model in eager mode, through its own attention hooks.
"""

from __future__ import annotations

import torch

from attncc.apply import ApplyError, apply
from attncc.counters import counters
from attncc.explain import Report, explain
from attncc.ir.masks import MaskError
from attncc.runtime.selection_cache import SelectionCache, default_selection_cache, reset_selection
from attncc.spec import SiteShape, Spec, SpecError, load_spec, plan_for
from attncc.version import __version__

__all__ = [
    "apply",
    "ApplyError",
    "Spec",
    "SpecError",
    "MaskError",
    "load_spec",
    "dense_mask",
    "explain",
    "Report",
    "counters",
    "SelectionCache",
    "reset_selection",
    "default_selection_cache",
    "__version__",
]


def dense_mask(spec, q_len: int, kv_len: int | None = None, num_heads: int = 1, layer: int = 0, module: str = ""):
    """Bool ``[H, Sq, Skv]`` mask the spec gives an attention at ``layer``/``module``, in the
    model's token order (the reference every kernel is tested against). A site no rule
    matches is dense (all True)."""
    spec = load_spec(spec)
    kv_len = q_len if kv_len is None else kv_len
    shape = SiteShape(num_heads=num_heads, q_len=q_len, kv_len=kv_len, layer=layer, module=module)
    plan = plan_for(spec, shape, check=False)
    if plan is None:
        return torch.ones(num_heads, q_len, kv_len, dtype=torch.bool)
    try:
        return plan.dense_mask()
    except MaskError as e:
        raise spec.error(e.message, ("rules", spec.match(layer, module), "mask")) from None
