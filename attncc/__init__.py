"""attncc: a compiler for sparse attention.

``torch.compile(model, backend="attncc", options={"spec": "my.yaml"})`` finds every
attention in the traced graph, binds it to a policy from the YAML spec and replaces it
with a fused kernel generated for that pattern.
"""

from __future__ import annotations

from attncc.masks import MaskError
from attncc.spec import Spec, SpecError, load_spec

__version__ = "0.1.0"

__all__ = ["Spec", "SpecError", "MaskError", "load_spec", "dense_mask", "__version__"]


def dense_mask(spec, q_len: int, kv_len: int | None = None, num_heads: int = 1, layer: int = 0, module: str = ""):
    """Bool ``[H, Sq, Skv]`` mask the spec gives an attention at ``layer``/``module``, in the
    model's token order (the reference every kernel is tested against). A site no rule
    matches is dense (all True)."""
    import torch

    from attncc import masks as M

    spec = load_spec(spec)
    kv_len = q_len if kv_len is None else kv_len
    i = spec.match(layer, module)
    if i is None:
        return torch.ones(num_heads, q_len, kv_len, dtype=torch.bool)
    programs, index = spec.head_policy(i, num_heads)
    out = torch.empty(num_heads, q_len, kv_len, dtype=torch.bool)
    for p_i, prog in enumerate(programs):
        heads = [h for h, j in enumerate(index) if j == p_i]
        try:
            out[heads] = M.dense(prog, q_len, kv_len, heads=heads)
        except MaskError as e:
            raise spec.error(e.message, ("rules", i, "mask")) from None
    return out


from attncc.counters import counters  # noqa: E402

__all__ += ["explain", "Report", "counters"]


# Imported eagerly, not lazily: loading the submodule ``attncc.explain`` binds it as an attribute of
# the package, and a later first import would then shadow the function of the same name.
from attncc.explain import Report, explain  # noqa: E402

__all__ += ["SelectionCache", "reset_selection", "default_selection_cache"]


def reset_selection(cache=None) -> None:
    """Restart call reuse (``reuse: {dense_first, refresh_every}``) of every site compiled with
    ``cache`` (an :class:`attncc.SelectionCache`; default: the process-wide one) at call 0.
    See :func:`attncc.selection_cache.reset_selection`."""
    from attncc.selection_cache import reset_selection as _reset

    _reset(cache)


def __getattr__(name):
    if name in ("SelectionCache", "default_selection_cache"):
        from attncc import selection_cache

        return getattr(selection_cache, name)
    raise AttributeError(f"module 'attncc' has no attribute '{name}'")
