"""The main job on a CPU: compile a small Llama-style model with a StreamingLLM spec, show what attncc
found and bound, check the output against the dense reference, and dump every generated kernel.

    python examples/demo.py [--seq 2048] [--spec specs/streaming.yaml] [--dump attncc_dump]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attncc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_model(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def reference_mask(spec, model, seq: int) -> torch.Tensor:
    """The dense reference: per layer, the spec's mask intersected with the model's causal mask,
    handed to the uncompiled model as explicit 4-D additive masks (one per layer)."""
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    heads = model.config.num_attention_heads
    masks = []
    for layer in range(model.config.num_hidden_layers):
        allowed = (
            attncc.dense_mask(spec, seq, num_heads=heads, layer=layer, module=f"model.layers.{layer}.self_attn")
            & causal
        )
        masks.append(allowed)
    return torch.stack(masks)  # [L, H, S, S]


def run_reference(model, ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Uncompiled model, each layer's SDPA given its explicit mask (hooks swap the mask in per layer)."""
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.sdpa_attention_forward

    def with_mask(module, query, key, value, attention_mask, **kw):
        kw.pop("is_causal", None)
        mask = masks[module.layer_idx].unsqueeze(0)
        return original(module, query, key, value, mask, is_causal=False, **kw)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["sdpa"] = with_mask
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--spec", default=str(ROOT / "specs" / "streaming.yaml"))
    ap.add_argument("--dump", default="attncc_dump")
    ap.add_argument("--inner", default="eager", choices=("eager", "inductor"))
    args = ap.parse_args(argv)

    spec = attncc.load_spec(args.spec)
    model = build_model(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    print(f"model: Llama-style, {args.layers} layers, 8 heads / 2 kv heads, head dim 32, seq {args.seq}")
    print(f"spec:  {args.spec} ({spec.name})\n")

    report = attncc.explain(model, ids, spec=spec)
    print(report, "\n")

    started = time.time()
    t0 = time.perf_counter()
    # inner="eager": the rest of the model runs eagerly, which keeps this demo's compile time short on a
    # small CPU; the default hands it to inductor.
    compiled = torch.compile(
        model, backend="attncc", options={"spec": spec, "dump_dir": args.dump, "inner": args.inner}
    )
    with torch.no_grad():
        out = compiled(ids).logits
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(ids).logits
    t_run = time.perf_counter() - t0

    masks = reference_mask(spec, model, args.seq)
    ref = run_reference(model, ids, masks)
    err = (out - ref).abs().max().item()
    print(
        f"max |attncc - dense reference| on the logits: {err:.2e}   (compile + first call {t_first:.1f} s, "
        f"second call {t_run:.2f} s)"
    )

    causal_pairs = args.seq * (args.seq + 1) / 2
    kept = masks.flatten(2).sum(2).double().mean(1)  # [L], averaged over heads
    print(
        "attention pairs kept per layer, as a share of causal: "
        + ", ".join(f"L{i} {float(k) / causal_pairs:.1%}" for i, k in enumerate(kept))
    )
    visited = total = 0
    for s in report.sites:
        if s.plan is None:
            continue
        bt = s.plan.block_table()
        per_program = bt.visited().tolist()
        visited += sum(per_program[p] for p in s.plan.head_to_program)
        total += bt.num_q_blocks * bt.num_kv_blocks * s.plan.num_heads
    if total:
        print(
            f"kv blocks computed: {visited} of {total} ({visited / total:.1%}); "
            f"{1 - visited / total:.1%} of the dense work skipped"
        )

    dump = pathlib.Path(args.dump)
    # the dump folder may hold earlier runs: show what this run wrote
    manifests = [m for m in sorted(dump.glob("*/manifest.json")) if m.stat().st_mtime >= started]
    kernels = [k for m in manifests for k in sorted(m.parent.glob("*_fwd_kernel*.py"))]
    print(f"\ndump: {dump.resolve()}  ({len(manifests)} graph folder(s), {len(kernels)} kernel source(s))")
    for k in kernels[:4]:
        print(f"  {k}")
    if manifests:
        m = json.loads(manifests[-1].read_text())
        print(f"  manifest: {manifests[-1]} ({len(m.get('sites', []))} sites)")
    ok = err < 1e-3
    print("\nOK: compiled output matches the dense reference" if ok else "\nMISMATCH against the dense reference")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
