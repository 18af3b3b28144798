#!/usr/bin/env bash
# The GPU run, on a bare machine with no network: preflight, the CUDA tests, the decode benchmark
# and the attention matrix (bf16, S = 4k..32k, head dim 64 and 128) against compiled FlexAttention
# and the best SDPA backend. Installs nothing from the network: attncc is laid out the way its
# package-dir mapping installs it (attncc/, codegen/ -> attncc/codegen, passes/ -> attncc/passes)
# in a private folder, and wheels carried in .whl/ (pydantic, absent there) are installed offline.
# Every step has its own time limit and writes as it goes, so the run ends well inside 8 minutes
# with whatever finished.
#
#   bench/gpu.sh OUTDIR            # on the GPU machine
#   bench/gpu.sh OUTDIR --dry-run  # here, on CPU: the same script end to end, Triton interpreter,
#                                  # tiny shapes (CI runs this)
set -u -o pipefail
OUT="${1:?usage: bench/gpu.sh OUTDIR [--dry-run]}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)
LIMIT=$([ "$DRY" = 1 ] && echo 240 || echo 460)
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
step() { echo "== $* ($(( $(date +%s) - START ))s)" | tee -a "$OUT/log.txt"; }

# -- packages: carried wheels, then attncc laid out as installed -------------------------------
SITE=$(mktemp -d "${TMPDIR:-/tmp}/attncc-site-XXXXXX")
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step "installing carried wheels offline"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    2>&1 | tee -a "$OUT/log.txt" || { echo "carried wheels failed to install" | tee -a "$OUT/log.txt"; exit 2; }
fi
cp -r attncc "$SITE/attncc"
cp -r codegen "$SITE/attncc/codegen"
cp -r passes "$SITE/attncc/passes"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1
if [ "$DRY" = 1 ]; then export ATTNCC_GPU_DRY_RUN=1; fi

step "preflight"
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import importlib, sys
missing = []
for name in ("torch", "triton", "numpy", "yaml", "networkx", "pydantic", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - every missing package is named, then the run stops
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("missing packages: " + "; ".join(missing) + " (carry wheels in .whl/, see the device README)")
    sys.exit(2)
import torch, triton, attncc
import attncc.codegen.executors  # the package-dir layout is importable
print("torch", torch.__version__, "triton", triton.__version__, "attncc", attncc.__version__, attncc.__file__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)")
PY
[ $? -eq 0 ] || { echo "preflight failed" | tee -a "$OUT/log.txt"; exit 2; }
if [ "$DRY" = 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$OUT/env.txt"; fi

step "CUDA tests"
timeout $(( $(left) < 150 ? $(left) : 150 )) python3 -m pytest -q -x --no-header -p no:cacheprovider tests/test_cuda.py \
  2>&1 | tee "$OUT/tests.txt" | tail -5
TESTS=$?

MACHINE=$(python3 -c "from bench.attention import machine_name; print(machine_name())")
if [ "$DRY" = 1 ]; then
  step "decode benchmark (tiny)"
  timeout "$(left)" python3 -m bench.decode --contexts 1536 --repeats 2 --out "$OUT/decode-$MACHINE.json" 2>&1 | tail -4
  step "attention matrix (tiny)"
  timeout "$(left)" python3 -m bench.attention --seqs 256 --heads 2 --dim 16 --cases causal window256 --repeats 1 \
    --no-masked-sdpa --out "$OUT/$MACHINE.json" 2>&1 | tail -4
else
  step "decode benchmark"
  timeout 120 python3 -m bench.decode --repeats 30 --out "$OUT/decode-$MACHINE-$(date +%F).json" 2>&1 | tail -6
  JSON="$OUT/$MACHINE-$(date +%F).json"
  # D=64 over the length range, D=128 at 8k; rows are written as they finish
  for spec in "64 4096 16384 32768" "128 8192"; do
    set -- $spec
    dim=$1; shift
    budget=$(left)
    if [ "$budget" -lt 30 ]; then step "time budget spent; skipping D=$dim"; continue; fi
    step "matrix D=$dim S=$* (budget ${budget}s)"
    timeout "$budget" python3 -m bench.attention --device cuda --dtype bfloat16 --dim "$dim" --seqs "$@" \
      --repeats 10 --max-masked-seq 8192 --out "$JSON" 2>&1 | tail -12
  done
fi
step "done: tests exit $TESTS, results in $OUT"
rm -rf "$SITE"
exit "$TESTS"
