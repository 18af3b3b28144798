"""``attncc.apply(model, spec=...)``: switch a Hugging Face transformers or diffusers model's
attention to attncc's kernels in eager mode, through the model's own hooks, without
``torch.compile``.

Diffusers models (attention modules holding a ``processor``): while each attention module runs, a
torch-function mode sends its ``scaled_dot_product_attention`` calls (diffusers' native backend)
to attncc's op when a rule binds the module (path, layer = the number in the path), keeping the
call's mask tensor and ``is_causal``; other calls run as written. Under ``torch.compile`` Dynamo
traces the hooks and the mode; each call's binding is a constant of the graph (no graph break).
The rest of this docstring is about transformers models.

The model's attention implementation becomes a registered ``AttentionInterface`` function
(``attncc-<n>``) with an ``AttentionMaskInterface`` mask function under the same name. The mask
function keeps what the model asked for (its mask function, padding, query and key offsets)
instead of building a tensor; the attention function then, per call:

* finds the rule of the module (its path in the model and its layer index, as ``torch.compile``
  binding does) and, when none matches, runs the attention the model had before ``apply``
  (``sdpa`` or ``eager``) with the mask that implementation's own mask function builds: exactly
  what the model computed;
* otherwise binds a plan: the rule's masks intersected with the model's mask. A plain causal mask
  is structure (``causal`` over positions, so blocks are skipped); anything else the model's mask
  function says (padding, sliding windows, packed sequences, bidirectional or custom masks) is
  the bool tensor that function builds, applied on top; queries sit at the model's absolute
  positions (``q_offset``: the cache position, at prefill, chunks and decode alike);
* runs the plan through ``torch.ops.attncc.attention`` (the op ``torch.compile(backend="attncc")``
  rewrites to), so forward and backward are the same kernels in both modes.

Attention dropout in training, key offsets (a sliding-window cache that dropped keys) and head
layouts the spec cannot take leave the call to the model's attention with a log line (an error
under ``strict=True``). ``attncc.apply(model, spec=None)`` restores the previous implementation.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from attncc.backend import setup_logging
from attncc.ir import masks as M
from attncc.ir.dtypes import dtype_name
from attncc.ir.score_mod import ScoreMod
from attncc.passes.detect import layer_of
from attncc.runtime import registry
from attncc.spec import SiteShape, Spec, SpecError, load_spec, plan_for

log = logging.getLogger("attncc")

_COUNTER = itertools.count()
_LOCK = threading.Lock()


class ApplyError(RuntimeError):
    """``attncc.apply`` cannot switch this model, or (``strict``) a call it cannot run."""


class ModelMask(torch.Tensor):
    """What the model's mask function was asked for, kept as structure: ``kwargs`` are the
    arguments transformers passed to its mask interface (``batch_size``, ``q_length``,
    ``kv_length``, ``q_offset``, ``kv_offset``, ``mask_function``, ``attention_mask`` (2D
    padding), ...). It is a storage-less ``meta`` tensor of the mask's shape ``[B, 1, Sq, Skv]``,
    so transformers treats it as a prepared 4D mask (``generate()`` with a static cache builds the
    mask once and passes it back in); any operation on it gives a plain meta tensor, so model code
    that computes with it fails loudly instead of using a wrong mask."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
    kwargs: dict

    @staticmethod
    def __new__(cls, kwargs: dict):
        shape = (int(kwargs["batch_size"]), 1, int(kwargs["q_length"]), int(kwargs["kv_length"]))
        t = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=torch.bool, device="meta"))
        t.kwargs = kwargs
        return t

    def tensor(self, implementation: str, **overrides):
        """The mask ``implementation``'s own mask function builds from the same arguments."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](**{**self.kwargs, **overrides})


def _int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


@dataclass
class _State:
    spec: Spec
    previous: str
    executor: str
    strict: bool
    paths: dict[int, str]
    #: (module path, shape key) -> registered plan key, or None for a site no rule matches
    plans: dict[tuple, str | None] = field(default_factory=dict)


def _refuse(state: _State | _ModuleState, path: str, why: str) -> None:
    if state.strict:
        raise ApplyError(f"attncc.apply: {path}: {why}")
    log.info("attncc.apply: %s runs the model's attention: %s", path, why)


#: keyword arguments transformers passes to attention functions that sdpa and eager attention
#: do not read (the mask carries windows and positions); any other one with a value (a relative
#: bias, a soft-cap, attention sinks, ...) changes the result, so such a call runs the model's own
_HARMLESS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "sliding_window",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "output_attentions",
        "is_causal",
    }
)
_eager_defaults: dict[type, Any] = {}


def _call_site_eager(module) -> Any:
    """The eager attention function ``module``'s forward falls back to (the default argument of
    its ``ALL_ATTENTION_FUNCTIONS.get_interface`` call, or what it assigns before dispatching):
    what the model runs with ``attn_implementation="eager"``. ApplyError when it cannot be found."""
    cls = type(module)
    hit = _eager_defaults.get(cls)
    if hit is not None:
        return hit
    fwd = inspect.unwrap(cls.forward)  # past decorators (deprecate_kwarg, ...) to the method itself
    try:
        src = inspect.getsource(fwd)
    except (OSError, TypeError):
        src = ""
    m = re.search(r"get_interface\((?:[^()]|\([^()]*\))*?,\s*([A-Za-z_]\w*)\s*\)", src, re.S)
    m = m or re.search(r"attention_interface\s*(?::[^=\n]*)?=\s*([A-Za-z_]\w*)\s*$", src, re.M)
    fn = fwd.__globals__.get(m.group(1)) if m else None
    if not callable(fn):
        raise ApplyError(
            f"attncc.apply: cannot find the eager attention function {cls.__name__}.forward uses, so its calls "
            "that attncc does not take cannot run as before; switch the model to attn_implementation='sdpa' first"
        )
    _eager_defaults[cls] = fn
    return fn


def _attention_function(state: _State):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def previous(module, query, key, value, mask, **kwargs):
        tensor = mask.tensor(state.previous) if isinstance(mask, ModelMask) else mask
        fn = _call_site_eager(module) if state.previous == "eager" else ALL_ATTENTION_FUNCTIONS[state.previous]
        return fn(module, query, key, value, tensor, **kwargs)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        path = state.paths.get(id(module), type(module).__name__)
        run_as_before = functools.partial(
            previous, module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        # soft-capping is compiled into the kernels; other extras change what attncc would compute
        softcap = kwargs.get("softcap")
        extra = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS and k != "softcap")
        if extra:
            _refuse(state, path, f"the model passes {', '.join(extra)} to its attention (attncc does not apply them)")
            return run_as_before()
        if kwargs.get("output_attentions"):
            _refuse(state, path, "attention weights were requested (output_attentions)")
            return run_as_before()
        if not isinstance(attention_mask, (ModelMask, type(None))):
            _refuse(state, path, "the model passed a prepared mask tensor, not its mask arguments")
            return run_as_before()
        if dropout and module.training:
            _refuse(state, path, f"attention dropout {dropout} in training")
            return run_as_before()
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            _refuse(state, path, f"softcap {softcap!r} is not a positive number")
            return run_as_before()
        mod = None if softcap is None else ScoreMod(softcap=float(softcap))
        site = _site(state, module, path, query, key, value, attention_mask, scaling, kwargs.get("is_causal"), mod)
        if site is None:
            return run_as_before()
        plan_key, tensor, positions = site
        out, _ = torch.ops.attncc.attention(query, key, value, tensor, positions, None, plan_key, state.executor)
        return out.transpose(1, 2).contiguous(), None

    return attention


@torch.compiler.disable
def _mask_function(**kwargs) -> ModelMask:
    # offsets may be a cache's live counters (a static cache bumps its length in place when a
    # layer writes its keys): keep their values now, as a mask tensor built here would
    snap = {
        k: v.clone() if isinstance(v, torch.Tensor) and k in ("q_offset", "kv_offset") else v for k, v in kwargs.items()
    }
    return ModelMask(snap)


def _bound_plan(
    state,
    site_key: tuple,
    path: str,
    layer: int,
    query,
    key,
    value,
    scale,
    model_mask,
    mask_kind,
    q_offset: int,
    q_positions,
    score_mod: ScoreMod | None = None,
) -> str | None:
    """The registered plan key the spec binds this site to, cached per ``site_key`` in
    ``state.plans``; None when no rule matches or the rule cannot bind here (logged; raised under
    ``strict``)."""
    if site_key not in state.plans:
        b, h, q_len, d = query.shape
        shape = SiteShape(
            num_heads=h,
            q_len=q_len,
            kv_len=key.shape[2],
            layer=layer,
            module=path,
            num_kv_heads=key.shape[1],
            head_dim=d,
            head_dim_v=value.shape[-1],
            dtype=dtype_name(query.dtype),
            scale=scale if scale is not None else d**-0.5,
            model_mask=model_mask,
            mask_kind=mask_kind,
            q_offset=q_offset,
            q_positions=q_positions,
            score_mod=score_mod,
        )
        try:
            plan = plan_for(state.spec, shape)
        except SpecError as e:
            if state.strict:
                raise
            log.info("attncc.apply: %s runs the model's attention: the spec cannot bind it: %s", path, e)
            plan = None
        if plan is None:
            log.debug("attncc.apply: %s matches no rule: it runs as the model wrote it", path)
        if len(state.plans) > 4096:
            state.plans.clear()
        state.plans[site_key] = None if plan is None else registry.register_plan(plan)
    return state.plans[site_key]


def _closure(fn, name: str):
    """The value ``fn`` closes over as ``name``."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _packed_documents(fn) -> tuple[Any, torch.Tensor] | None:
    """``(base mask function, document ids [B, S])`` when ``fn`` is the mask transformers builds for
    packed sequences (its ``create_causal_mask`` with packed ``position_ids``:
    ``and_masks(remap_positions_for_packed_sequence(base, position_ids),
    packed_sequence_mask_function(ids))``), else None. Within a document the packed positions
    are consecutive, so ``base`` over them is ``base`` over token indices."""
    names = (
        "and_masks.<locals>.and_mask",
        "remap_positions_for_packed_sequence.<locals>.inner_mask",
        "packed_sequence_mask_function.<locals>.inner_mask",
    )
    try:
        if getattr(fn, "__qualname__", None) != names[0] or fn.__module__ != "transformers.masking_utils":
            return None
        parts = _closure(fn, "mask_functions")
        if len(parts) != 2 or tuple(getattr(f, "__qualname__", None) for f in parts) != names[1:]:
            return None
        remap, packed = parts
        ids = _closure(packed, "packed_sequence_mask")
        if not isinstance(ids, torch.Tensor):
            return None
        return _closure(remap, "mask_function"), ids
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _causal_mask_function():
    from transformers.masking_utils import causal_mask_function

    return causal_mask_function


@torch.compiler.disable
def _site(
    state: _State,
    module,
    path: str,
    query,
    key,
    value,
    mask: ModelMask | None,
    scaling,
    is_causal=None,
    score_mod: ScoreMod | None = None,
):
    """``(plan key, mask tensor or None, positions or None)`` for this call, or None when the
    model's attention runs it (no rule, or a refusal that was logged)."""
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    kw = mask.kwargs if mask is not None else {}
    q_offset = _int(kw["q_offset"]) if "q_offset" in kw else kv_len - q_len
    kv_offset = _int(kw.get("kv_offset", 0))
    if mask is None:
        # as transformers' sdpa attention: the call's is_causal, else the module's
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    else:
        causal = kw.get("mask_function") is _causal_mask_function()
    # packed sequences: transformers' causal mask within the documents of the packed position ids
    packed = _packed_documents(kw.get("mask_function")) if mask is not None else None
    documents = None
    if packed is not None and packed[0] is _causal_mask_function() and kw.get("attention_mask") is None:
        causal, documents = True, packed[1]
    # a plain causal mask is structure; anything else is the model's own mask tensor
    structural = mask is None or (causal and kw.get("attention_mask") is None)
    if kv_offset != 0:
        _refuse(state, path, f"its keys start at position {kv_offset} (a cache that dropped keys)")
        return None
    if not causal and mask is None and q_len != kv_len:
        _refuse(state, path, "a non-causal attention whose queries' positions among the keys are unknown")
        return None
    # a dynamic cache appends the queries' keys last ("end"); a static one holds them at the cache
    # position ("given", passed per call)
    where: Literal["end", "given"] = "end" if q_offset == kv_len - q_len else "given"
    layer = getattr(module, "layer_idx", None)
    layer = int(layer) if layer is not None else (layer_of(path) or 0)
    dims = (b, h, key.shape[1], q_len, kv_len, d, value.shape[-1], str(query.dtype), scaling, score_mod)
    site_key = (path, layer, *dims, structural, causal, where, documents is not None)
    model_mask = M.Causal() if structural and causal else M.Full()
    kind: Literal["bool", "documents"] | None = None if structural else "bool"
    if documents is not None:
        kind = "documents"
    plan_key = _bound_plan(
        state, site_key, path, layer, query, key, value, scaling, model_mask, kind, q_offset, where, score_mod
    )
    if plan_key is None:
        return None
    positions = torch.arange(q_offset, q_offset + q_len) if where == "given" else None
    tensor = None
    if documents is not None:
        if tuple(documents.shape[-1:]) != (kv_len,) or q_len != kv_len:
            _refuse(state, path, "packed document ids that do not cover the keys")
            return None
        return plan_key, documents.expand(b, kv_len), positions
    if not structural:
        assert mask is not None
        # the model's mask exactly as its sdpa mask function builds it, never skipped to None
        tensor = mask.tensor("sdpa", allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        if tensor is None:
            _refuse(state, path, "its mask function built no mask tensor")
            return None
        if tensor.dtype != torch.bool:
            tensor = tensor > torch.finfo(tensor.dtype).min / 2
    return plan_key, tensor, positions


class _SdpaInterceptor(torch.overrides.TorchFunctionMode):
    """Inside one attention module's forward: its ``F.scaled_dot_product_attention`` calls go to
    attncc's op when a rule binds them, and run as written otherwise."""

    def __init__(self, state: _ModuleState, path: str):
        super().__init__()
        self.state, self.path = state, path

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            out = _sdpa_site(self.state, self.path, *args, **kwargs)
            if out is not None:
                return out
        elif getattr(func, "__module__", None) == "torch._tensor" and args and isinstance(args[0], torch.Tensor):
            # a Tensor method written in Python (unflatten, split, ...): called again as a method,
            # with this mode off now, it is the same call; calling the function object instead
            # makes Dynamo trace its body, whose ``super()`` call it cannot trace (a graph break
            # that skips the whole frame of a loop over blocks)
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


@dataclass
class _ModuleState:
    spec: Spec
    executor: str
    strict: bool
    handles: list = field(default_factory=list)
    plans: dict[tuple, str | None] = field(default_factory=dict)
    #: per thread, the interceptors of the attention modules running now (torch-function modes
    #: are per thread too)
    local: threading.local = field(default_factory=threading.local)

    @property
    def modes(self) -> list:
        if not hasattr(self.local, "modes"):
            self.local.modes = []
        return self.local.modes


def _sdpa_site(
    state: _ModuleState,
    path: str,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
):
    """The attncc op's output for one SDPA call of a diffusers attention, or None to run it as
    the model wrote it (no rule matches, or a refusal that is logged)."""
    mask_dtype = None if attn_mask is None else attn_mask.dtype
    shapes = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
    plan_key = _module_plan(state, path, *shapes, query.dtype, mask_dtype, dropout_p, is_causal, scale, enable_gqa)
    if plan_key is None:
        return None
    mask = attn_mask
    if mask is not None and mask.dim() < 4:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    out, _ = torch.ops.attncc.attention(query, key, value, mask, None, None, plan_key, state.executor)
    return out


# a function of the call's shapes, dtypes and flags only: under torch.compile it runs once while
# Dynamo traces (the graph guards on those shapes) and its key is a constant of the graph, so
# binding neither breaks the graph nor runs again per call
@torch._dynamo.assume_constant_result
def _module_plan(
    state: _ModuleState,
    path: str,
    q_shape: tuple,
    k_shape: tuple,
    v_shape: tuple,
    dtype: torch.dtype,
    mask_dtype: torch.dtype | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> str | None:
    """The plan key of one SDPA call (None: it runs as written; refusals are logged, raised under
    ``strict``)."""
    if dropout_p:
        _refuse(state, path, f"attention dropout {dropout_p}")
        return None
    if len(q_shape) != 4 or len(k_shape) != 4 or (k_shape[1] != q_shape[1] and not enable_gqa):
        _refuse(state, path, f"SDPA operands {q_shape} / {k_shape} are not [B, H, S, D] heads")
        return None
    b, h, q_len, d = q_shape
    kv_len = k_shape[2]
    layer = layer_of(path) or 0
    kind: Literal["bool", "additive"] | None = None
    if mask_dtype is not None:
        kind = "bool" if mask_dtype == torch.bool else "additive"
    where: Literal["start", "unknown"] = "start" if (q_len == kv_len or is_causal) else "unknown"
    site_key = (path, b, h, k_shape[1], q_len, kv_len, d, v_shape[-1], str(dtype), scale, kind, is_causal)
    # _bound_plan reads the operands' shapes and dtype only
    query, key, value = (torch.empty(s, dtype=dtype, device="meta") for s in (q_shape, k_shape, v_shape))
    model_mask = M.Causal() if is_causal else M.Full()
    return _bound_plan(state, site_key, path, layer, query, key, value, scale, model_mask, kind, 0, where)


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """diffusers attention modules (they hold a ``processor``), outermost first."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


def _apply_modules(model: torch.nn.Module, spec, executor: str, strict: bool):
    """``attncc.apply`` for diffusers models: each attention module's SDPA calls intercepted while
    its forward runs (forward hooks and a torch-function mode)."""
    old: _ModuleState | None = getattr(model, "_attncc_module_state", None)
    if old is not None:
        for handle in old.handles:
            handle.remove()
        del model._attncc_module_state
    if spec is None:
        return model
    sites = _attention_modules(model)
    if not sites:
        raise ApplyError(
            f"attncc.apply: {type(model).__name__} is neither a transformers PreTrainedModel nor a diffusers model "
            "with attention processors; use torch.compile(model, backend='attncc')"
        )
    state = _ModuleState(load_spec(spec), executor, strict)

    for path, module in sites:

        def enter(mod, args, path=path):
            mode = _SdpaInterceptor(state, path)
            mode.__enter__()
            state.modes.append(mode)

        def leave(mod, args, output):
            state.modes.pop().__exit__(None, None, None)

        state.handles.append(module.register_forward_pre_hook(enter))
        state.handles.append(module.register_forward_hook(leave, always_call=True))
    setattr(model, "_attncc_module_state", state)  # noqa: B010 (a module attribute, not a submodule)
    return model


def apply(model, spec=None, *, executor: str = "auto", strict: bool = False):
    """Switch ``model`` (a transformers ``PreTrainedModel``) to attncc's kernels for the attentions
    ``spec`` covers, in eager mode; ``spec=None`` restores the implementation it had. Returns the
    model. ``executor``: as ``torch.compile``'s option (``auto``: ``torch`` on CPU, ``triton`` on
    CUDA). ``strict``: raise instead of leaving a call to the model's attention."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise ApplyError("attncc.apply needs transformers (AttentionInterface)") from e
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        setup_logging()
        return _apply_modules(model, spec, executor, strict)
    state: _State | None = getattr(model, "_attncc_state", None)
    if spec is None:
        if state is not None:
            model.set_attn_implementation(state.previous)
            del model._attncc_state
        return model
    setup_logging()
    loaded = load_spec(spec)
    previous = state.previous if state is not None else config._attn_implementation
    if previous not in ("sdpa", "eager"):
        raise ApplyError(
            f"attncc.apply: the model runs attention implementation '{previous}'; attncc.apply takes "
            "models on 'sdpa' or 'eager' (their attentions are what attncc reproduces where no rule applies)"
        )
    with _LOCK:
        name = f"attncc-{next(_COUNTER)}"
    new = _State(loaded, previous, executor, strict, {id(m): n for n, m in model.named_modules()})
    AttentionInterface.register(name, _attention_function(new))
    AttentionMaskInterface.register(name, _mask_function)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ApplyError(
            f"attncc.apply: {type(model).__name__} did not take attention implementation '{name}' "
            "(models that do not dispatch through AttentionInterface cannot be switched; use torch.compile)"
        )
    model._attncc_state = new
    return model


__all__ = ["apply", "ApplyError", "ModelMask"]
