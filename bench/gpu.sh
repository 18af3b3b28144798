#!/usr/bin/env bash
# GPU benchmark for an H100 with no network: CUDA kernel tests, then the attention matrix
# (bf16, S = 4k..32k, head dim 64 and 128) vs compiled FlexAttention and SDPA-flash.
# Installs nothing; every step has its own time limit so the whole run stays under 8 minutes.
# Usage: bench/gpu.sh OUTDIR
set -u
OUT="${1:?usage: bench/gpu.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_FX_GRAPH_CACHE=1
START=$(date +%s)
left() { echo $(( 450 - ($(date +%s) - START) )); }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$OUT/env.txt"

echo "== CUDA kernel tests" | tee "$OUT/tests.txt"
timeout 150 python -m pytest -q -m cuda -x --no-header -p no:cacheprovider tests 2>&1 | tail -30 | tee -a "$OUT/tests.txt"

MACHINE=$(python -c "from bench.attention import machine_name; print(machine_name())")
JSON="$OUT/$MACHINE-$(date +%F).json"
# D=64 over the whole length range, D=128 at 8k; each run writes its rows as they finish
for spec in "64 4096 16384 32768" "128 8192"; do
  set -- $spec
  dim=$1; shift
  budget=$(left)
  if [ "$budget" -lt 30 ]; then echo "time budget spent; skipping D=$dim" | tee -a "$OUT/matrix.txt"; continue; fi
  echo "== matrix D=$dim S=$* (budget ${budget}s)" | tee -a "$OUT/matrix.txt"
  timeout "$budget" python -m bench.attention --device cuda --dtype bfloat16 --dim "$dim" --seqs "$@" \
      --repeats 10 --max-masked-seq 8192 --out "$JSON" 2>&1 | tee -a "$OUT/matrix.txt"
done
echo "results: $JSON ($(( $(date +%s) - START ))s)"
