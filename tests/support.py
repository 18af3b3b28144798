"""Builders the tests share: plans, seeded inputs, the dense block map and tolerances per dtype."""

from __future__ import annotations

import torch

from attncc.ir import masks as M
from attncc.ir.dtypes import DTYPES
from attncc.ir.plan import AttentionPlan

#: forward output / log-sum-exp tolerance of a kernel against the fp32 reference, per plan dtype
OUT_ATOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2, "float64": 1e-6}
LSE_ATOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3, "float64": 1e-6}


def make_plan(*programs: M.Mask, heads: int = 2, kv_heads: int | None = None, q_len: int = 64, **kw) -> AttentionPlan:
    """A test plan (:meth:`AttentionPlan.of`): 2 heads, 64 tokens, head dim 32, 16-token blocks."""
    return AttentionPlan.of(
        *programs, num_heads=heads, num_kv_heads=kv_heads, q_len=q_len, **{"head_dim": 32, "block": 16, **kw}
    )


def inputs(plan: AttentionPlan, batch: int = 1, seed: int = 0, device: str = "cpu", grad: bool = False):
    """Seeded ``(q, k, v, dout)`` of the plan's shapes and dtype (``dout`` for backward tests)."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[plan.dtype].torch
    shapes = [
        (batch, plan.num_heads, plan.q_len, plan.head_dim),
        (batch, plan.num_kv_heads, plan.kv_len, plan.head_dim),
        (batch, plan.num_kv_heads, plan.kv_len, plan.head_dim_v),
        (batch, plan.num_heads, plan.q_len, plan.head_dim_v),
    ]
    q, k, v, dout = (torch.randn(s, generator=g).to(device, dt) for s in shapes)
    if grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return q, k, v, dout


def nonempty_blocks(plan: AttentionPlan) -> torch.Tensor:
    """``[H, nq, nk]`` int32: 1 where the dense mask allows some pair of the block pair (kernel
    order): what a kernel may visit, computed without the block classifier."""
    dense = plan.dense_mask()
    order = plan.order()
    if order is not None:
        dense = dense[:, order][:, :, order]
    nq, nk = -(-plan.q_len // plan.block_q), -(-plan.kv_len // plan.block_kv)
    pad = torch.zeros(plan.num_heads, nq * plan.block_q, nk * plan.block_kv, dtype=torch.bool)
    pad[:, : plan.q_len, : plan.kv_len] = dense
    return pad.view(plan.num_heads, nq, plan.block_q, nk, plan.block_kv).any(4).any(2).int()


def tiny_llama(layers: int = 2, impl: str = "sdpa", train: bool = False, **config):
    """A Hugging Face Llama with random weights (seed 0): 4 heads on 2 kv heads, head dim 16."""
    import transformers

    cfg = transformers.LlamaConfig(
        **{
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            **config,
        }
    )
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    return model.train() if train else model.eval()


def rule_plan(spec, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
    """The plan a spec's rule gives a causal self-attention with these tensors (for reference
    attention functions that apply a rule's mask themselves)."""
    from attncc.spec import SiteShape, plan_for

    b, h, sq, d = query.shape
    shape = SiteShape(
        num_heads=h,
        q_len=sq,
        kv_len=key.shape[2],
        layer=layer,
        num_kv_heads=key.shape[1],
        head_dim=d,
        head_dim_v=value.shape[-1],
        scale=scaling,
        model_mask=M.Causal(),
    )
    plan = plan_for(spec, shape, check=False)
    assert plan is not None, f"no rule matches layer {layer}"
    return plan
