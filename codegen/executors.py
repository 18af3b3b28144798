"""Executors: run an AttentionPlan on tensors. ``run`` is the one entry point the custom op calls."""

from __future__ import annotations

import importlib.util

import torch

from attncc.plan import AttentionPlan

EXECUTORS = ("auto", "triton", "interpret", "torch", "reference")


def resolve_executor(name: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` on CPU; validates the name."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor '{name}'; expected one of {', '.join(EXECUTORS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def run(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_tensor: torch.Tensor | None = None,
    executor: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward attention per the plan: ``(out [B, H, Sq, Dv], lse [B, H, Sq] fp32)``."""
    name = resolve_executor(executor, q.device)
    if any(p.is_dynamic for p in plan.programs):
        # block tables built at run time from q/k (data-dependent selectors)
        from attncc.codegen.selectors import run_dynamic

        return run_dynamic(plan, q, k, v, mask_tensor, name)
    if name == "reference":
        from attncc.codegen.reference import attention_reference

        return attention_reference(plan, q, k, v, mask_tensor)
    if name == "torch":
        if importlib.util.find_spec("attncc.codegen.torch_exec") is not None:
            from attncc.codegen.torch_exec import attention_torch
        else:
            # until the block-sparse CPU path exists, the dense oracle serves
            from attncc.codegen.reference import attention_reference as attention_torch
        return attention_torch(plan, q, k, v, mask_tensor)
    from attncc.codegen.forward import attention_fwd

    if name == "interpret":
        return attention_fwd(plan, q, k, v, mask_tensor, target="interpret")
    return attention_fwd(plan, q, k, v, mask_tensor, target="cuda")
