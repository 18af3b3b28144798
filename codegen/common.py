"""What every executor shares: the input contract of a plan, checked once per call, and tile
arithmetic."""

from __future__ import annotations

import torch

from attncc.ir.documents import check_ids
from attncc.ir.plan import AttentionPlan


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= ``n`` and >= ``minimum``."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def check_inputs(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> None:
    """ValueError unless q/k/v/mask fit the plan's layout contract: q ``[B, H, Sq, D]``, k/v
    ``[B, Hkv, Skv, D / Dv]``, all of the plan's dtype on one device; a mask tensor exactly when
    the plan has a ``mask_kind`` (bool, or additive in a float dtype), broadcasting to
    ``[B, H, Sq, Skv]``; for ``documents``, integer ids ``[B or 1, Skv]``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"attention takes 4-D q/k/v [B, heads, seq, dim]; {name} has shape {tuple(t.shape)} "
                f"(q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
            )
    b = q.shape[0]
    expect = {
        "q": (q, (b, plan.num_heads, plan.q_len, plan.head_dim)),
        "k": (k, (b, plan.num_kv_heads, plan.kv_len, plan.head_dim)),
        "v": (v, (b, plan.num_kv_heads, plan.kv_len, plan.head_dim_v)),
    }
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(
                f"plan {plan.key()} expects {name} of shape {list(shape)} ({plan.num_heads} query / "
                f"{plan.num_kv_heads} kv heads), got {list(t.shape)}"
            )
        if t.dtype != plan.torch_dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but the plan was built for {plan.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if (mask is None) != (plan.mask_kind is None):
        raise ValueError(
            f"plan mask_kind is {plan.mask_kind!r} but the mask tensor is {'missing' if mask is None else 'given'}"
        )
    if mask is not None and plan.mask_kind == "documents":
        check_ids(mask, b, plan.kv_len, plan.q_len, plan.q_offset, q.device)
    elif mask is not None:
        if (mask.dtype == torch.bool) != (plan.mask_kind == "bool"):
            raise ValueError(f"mask tensor dtype {mask.dtype} does not match plan mask_kind {plan.mask_kind!r}")
        if mask.device != q.device:
            raise ValueError(f"mask tensor is on {mask.device} but q is on {q.device}")
        if mask.dim() > 4:
            raise ValueError(f"mask tensor of shape {tuple(mask.shape)} does not broadcast to [B, H, Sq, Skv]")


def mask_argument(
    mask: torch.Tensor | None, shape: tuple[int, int, int, int], placeholder: torch.Tensor, bool_as: torch.dtype
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The model's mask tensor as a kernel reads it: broadcast to ``shape`` ``[B, H, Sq, Skv]`` by
    strides (no copy), bool viewed as ``bool_as``; without a mask, ``placeholder`` and zero strides."""
    if mask is None:
        return placeholder, (0, 0, 0, 0)
    m = torch.broadcast_to(mask, shape)
    if m.dtype == torch.bool:
        m = m.view(bool_as)
    return m, m.stride()


def unit_stride_rows(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor as it is when its last dimension has unit stride, else a contiguous copy:
    ATen's fused CPU attention reads rows as dense vectors and silently misreads any other
    last-dim stride (transposed or sliced heads). Copies only what needs it, once per call."""
    return tuple(x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous() for x in xs)


def example_inputs(plan: AttentionPlan, batch: int = 1) -> dict[str, torch.Tensor | None]:
    """Uninitialised CPU tensors with the shapes, dtypes and layout of a call of ``plan`` (q, k, v,
    out, lse, dout and the model's mask tensor when the plan takes one): what ahead-of-time
    compiles launch with to see the arguments the real launch passes. Nothing is computed."""
    dt = plan.torch_dtype
    h, hkv, sq, skv = plan.num_heads, plan.num_kv_heads, plan.q_len, plan.kv_len
    mask = None
    if plan.mask_kind == "documents":
        mask = torch.zeros(batch, skv, dtype=torch.int32)
    elif plan.mask_kind is not None:
        mask = torch.empty(batch, 1, sq, skv, dtype=torch.bool if plan.mask_kind == "bool" else dt)
    return {
        "q": torch.empty(batch, h, sq, plan.head_dim, dtype=dt),
        "k": torch.empty(batch, hkv, skv, plan.head_dim, dtype=dt),
        "v": torch.empty(batch, hkv, skv, plan.head_dim_v, dtype=dt),
        "out": torch.empty(batch, h, sq, plan.head_dim_v, dtype=dt),
        "lse": torch.empty(batch, h, sq, dtype=torch.float32),
        "dout": torch.empty(batch, h, sq, plan.head_dim_v, dtype=dt),
        "mask": mask,
    }


def shape_text(plan: AttentionPlan, batch: int = 1) -> str:
    """The call a recorded ahead-of-time compile was specialised for, in words."""
    return (
        f"B={batch} H={plan.num_heads} Hkv={plan.num_kv_heads} q_len={plan.q_len} kv_len={plan.kv_len} "
        f"D={plan.head_dim}/{plan.head_dim_v} {plan.dtype}, contiguous 16-byte-aligned tensors"
    )
