#!/usr/bin/env bash
# GPU speed comparison of a compressed model against its original, eager and with torch.compile.
#
#   bash benchmarks/gpu_bench.sh CANDIDATE BASELINE OUT
#
# CANDIDATE, BASELINE: model folders (or any reference `effir bench` takes: smollm2-135m, a .gguf, a hub id).
#   CANDIDATE may also be `drop-last:K`: the script first builds BASELINE with its last K MLPs dropped
#   (`effir drop --strategy last`, ~20 s) into OUT/candidate; speed does not depend on which MLPs go.
# OUT: gets eager/bench.{json,md} and compiled/bench.{json,md}, a log per run, and gpu.txt.
#
# Run from anywhere with the repo's venv at .venv (or an already activated one holding CUDA torch). Budget on one
# H100 for smollm2-135m: < 1 min eager (full default grid: query 32 tokens x 1,8,32; documents 256,512 x 1,8,32) and
# ~2 min compiled; every new shape compiles once per model, so the compiled grid is 2 cells (query 32 x 32,
# documents 512 x 32). Each run is capped by `timeout` (EAGER_TIMEOUT=90, COMPILE_TIMEOUT=180 s; override by env), so
# the script ends in ~4.5 min at worst; a run that hits its cap writes no bench.json (its log says how far it got).
# Tokenization is excluded from all timings; dtype auto = bf16 on the GPU.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 CANDIDATE BASELINE OUT   (CANDIDATE may be drop-last:K)" >&2
  exit 2
fi
CANDIDATE=$1
BASELINE=$2
OUT=$(mkdir -p "$3" && cd "$3" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
# GPU images often have only python3 (the one holding CUDA torch); a venv has python.
PY=$(command -v python || command -v python3)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # works whether or not effir is pip-installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EAGER_TIMEOUT=${EAGER_TIMEOUT:-90}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-180}
DEVICE=${GPU_BENCH_DEVICE:-cuda}  # `cpu` only to dry-run this script on a tiny model
EXTRA=${GPU_BENCH_EXTRA:-}        # extra `effir bench` flags for both runs (dry runs: a tiny grid)

DEVICE="$DEVICE" "$PY" - <<'EOF'
import os, sys, torch
if os.environ["DEVICE"] == "cpu":
    print("gpu_bench.sh: dry run on the CPU")
elif not torch.cuda.is_available():
    sys.exit(f"gpu_bench.sh: torch {torch.__version__} sees no CUDA device; use a venv with CUDA torch on a GPU machine")
else:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true

if [[ "$CANDIDATE" == drop-last:* ]]; then
  K=${CANDIDATE#drop-last:}
  "$PY" -m effir drop "$BASELINE" --strategy last --mlp "$K" --output "$OUT/candidate" --overwrite \
    --device "$DEVICE" --dtype fp32 2>&1 | tee "$OUT/drop.log"
  CANDIDATE="$OUT/candidate/model"
fi

status=0
echo "== eager: full default grid (query 32 tokens x 1,8,32; documents 256,512 tokens x 1,8,32)"
timeout "$EAGER_TIMEOUT" "$PY" -m effir bench "$CANDIDATE" --baseline "$BASELINE" --output "$OUT/eager" \
  --device "$DEVICE" --dtype auto --min-time 0.3 $EXTRA 2>&1 | tee "$OUT/eager.log" || status=$?

echo "== compiled (torch.compile, static shapes): query 32 tokens x 32, documents 512 tokens x 32"
timeout "$COMPILE_TIMEOUT" "$PY" -m effir bench "$CANDIDATE" --baseline "$BASELINE" --output "$OUT/compiled" \
  --device "$DEVICE" --dtype auto --compile --query-batch-sizes 32 --doc-lengths 512 --doc-batch-sizes 32 \
  --warmup 3 --min-time 0.5 $EXTRA 2>&1 | tee "$OUT/compiled.log" || status=$?

for run in eager compiled; do
  if [ -f "$OUT/$run/bench.json" ]; then echo "$run: $OUT/$run/bench.md"; else echo "$run: FAILED or timed out (see $OUT/$run.log)"; fi
done
exit "$status"
