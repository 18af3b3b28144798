#!/bin/sh
# Regenerates the block-map pictures of docs/spec.md with the attncc CLI (run from the repository root).
set -e
pic() {  # name, mask (flow YAML), q_len, [block size]
    attncc explain "{attncc: 1, block_size: ${4:-16}, rules: [{mask: $2}]}" --q-len "$3" --heads 1 --layers 1 \
        --png "docs/img/$1.png" > /dev/null
}
pic full full 128
pic causal causal 128
pic window "{window: 24}" 128
pic window_before_after "{window: {before: 8, after: 24}}" 128
pic sink "{all: [causal, {sink: 8}]}" 128
pic prefix_lm "{any: [{prefix: 40}, causal]}" 128
pic global "{global: 12}" 128
pic chunk "{chunk: 24}" 128
pic block_causal "{block_causal: 32}" 128
pic strided "{all: [causal, {strided: 12}]}" 128
pic power "{power: 4}" 128
pic random_blocks "{random_blocks: {n: 2, seed: 0, block: 16}}" 128
pic tile3d_raster "{tile3d: {grid: [2, 8, 16], window: [1, 2, 2]}}" 256
pic neighborhood "{neighborhood: {grid: [1, 12, 16], kernel: [1, 5, 5]}}" 192
pic streaming "{all: [causal, {any: [{sink: 8}, {window: 32}]}]}" 128
pic not_window "{all: [causal, {not: {window: 32}}]}" 128
attncc explain "{attncc: 1, block_size: 16, rules: [{mask: {tile3d: {grid: [2, 8, 16], window: [1, 2, 2]}},
    permute: {grid: [2, 8, 16], tile: [2, 2, 4]}}]}" --q-len 256 --heads 1 --layers 1 --png docs/img/tile3d_tiled.png > /dev/null
attncc explain specs/duo.yaml --q-len 128 --heads 8 --layers 1 --png docs/img/duo_heads.png > /dev/null
attncc explain specs/masformer.yaml --q-len 128 --heads 1 --layers 8 --png docs/img/masformer_layers.png > /dev/null
python - <<'PY'
import torch
from attncc import draw
from attncc.ir.plan import AttentionPlan
from attncc.spec import parse_mask

# three documents of 40, 56 and 32 tokens, causal inside each
ids = torch.cat([torch.full((n,), d) for d, n in enumerate([40, 56, 32])])
plan = AttentionPlan.of(parse_mask("causal", {}), num_heads=1, q_len=128, head_dim=16, block=16, mask_kind="documents")
image, labels = draw.documents_image(plan, 0, ids)
draw.save("docs/img/documents.png", [draw.Panel(image, labels, "causal within documents 40, 56, 32")])
PY
