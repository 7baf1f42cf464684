#!/usr/bin/env bash
# Every GPU check and benchmark of the library, in one call of at most about 9 minutes (550 s).
#
#   bash benchmarks/gpu.sh            # results in $OUT if set, else benchmarks/gpu-results/
#
# Needs a CUDA machine with torch (CUDA build), torchmetrics, einops and numpy importable by
# $PYTHON (default: .venv/bin/python if it sees a GPU, else python3); the package is used from
# src/. Each step writes one file, runs under its own time limit (the worst case of all of them
# together is 550 s) and records a failure or a timeout in its file instead of stopping the
# script, so that one slow step does not cost the others; the script exits with 1 if any step
# failed or timed out (summary.txt lists them). In order of importance:
#   1. device.txt     nvidia-smi name, memory, driver; torch and CUDA versions
#   2. checks.txt     benchmarks/gpu_checks.py: every key vs the float64 reference on CPU for
#                     float16/bfloat16/float32/float64 inputs, no host-device sync in update,
#                     K = 50,000 and d = 4,096 computes and matches a float64 two-pass on the GPU
#   3. benchmark.md   benchmarks/metrics.py --device cuda on the issue's sizes (floor, ours, the
#                     float32-product option, two-pass baseline), then K = 50,000, d = 4,096
#   3b. profile.md    benchmarks/gpu_profile.py: kernels, device time and dispatch time of one
#                     metric update and of each regularizer (is a call launch-bound?)
#   3c. graphs.md     benchmarks/gpu_graphs.py: the metric update captured in a CUDA graph and
#                     replayed, against eager and the float32 floor (does a graph close the gap?)
#   4. losses.md      benchmarks/losses.py: overhead of each regularizer on a ResNet-18 training
#                     step at CIFAR size (batch 128, bf16 autocast, torch.compile row included),
#                     and the regularizer's cost against a linear head + cross-entropy
#   5. heads.md       benchmarks/heads.py --device cuda: heads vs nn.Linear, NearestETFHead's
#                     share of a ResNet-18 step at batch 128
#   6. recipes.md     benchmarks/recipes.py: ResNet-18 training throughput with and without the
#                     collapse evaluation (random CIFAR-sized images)
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
OUT_DIR="${OUT:-benchmarks/gpu-results}"
mkdir -p "$OUT_DIR"
export PYTHON PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FAILED=()

step() {  # step FILE LIMIT_SECONDS COMMAND...: run under a time limit, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S) UTC, limit ${limit} s): $*" | tee "$OUT_DIR/$name"
  local run=("$@")
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    run=(bash -c "$(declare -f "$1"); $1")
  fi
  timeout -k 10 "$limit" "${run[@]}" 2>&1 | tee -a "$OUT_DIR/$name"
  local status=${PIPESTATUS[0]}
  if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "== $name: ran past ${limit} s (exit $status)" | tee -a "$OUT_DIR/$name"
    FAILED+=("$name (ran past ${limit} s)")
  elif [[ $status -ne 0 ]]; then
    echo "== $name: FAILED (exit $status)" | tee -a "$OUT_DIR/$name"
    FAILED+=("$name (exit $status)")
  fi
}

device_info() {
  "$PYTHON" - <<'PY'
import torch, torchmetrics
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}, torchmetrics {torchmetrics.__version__}")
PY
  local status=$?  # torch's view decides; nvidia-smi is informative only
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  return $status
}

metrics_benchmark() {
  "$PYTHON" benchmarks/metrics.py --device cuda --repeats 2 \
    --sizes 20000x1024x1000,50000x256x10000,100000x4096x100 &&
    echo &&
    "$PYTHON" benchmarks/metrics.py --device cuda --repeats 1 --methods floor,ours \
      --sizes 100000x4096x50000
}

step device.txt 30 device_info
step checks.txt 110 "$PYTHON" benchmarks/gpu_checks.py --device cuda --large 100000x4096x50000
step benchmark.md 145 metrics_benchmark
step profile.md 35 "$PYTHON" benchmarks/gpu_profile.py --device cuda
step graphs.md 25 "$PYTHON" benchmarks/gpu_graphs.py --device cuda
step losses.md 100 "$PYTHON" benchmarks/losses.py --device cuda --model resnet18 \
  --batch-size 128 --amp bf16 --compile --rounds 5
step heads.md 55 "$PYTHON" benchmarks/heads.py --device cuda --quick --resnet-batch 128 \
  --skip-codes
step recipes.md 50 "$PYTHON" benchmarks/recipes.py --skip-default --device cuda \
  --threads none --train 5000 --test 1000
if ((${#FAILED[@]})); then
  printf '%s\n' "steps that failed or timed out:" "${FAILED[@]}" | tee "$OUT_DIR/summary.txt"
  echo "results in $OUT_DIR"
  exit 1
fi
echo "every step passed" | tee "$OUT_DIR/summary.txt"
echo "results in $OUT_DIR"
