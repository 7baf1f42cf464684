#!/usr/bin/env bash
# Every GPU check and benchmark of the library, in one call (about 10 minutes on an H100/H200).
#
#   bash benchmarks/gpu.sh            # results in $OUT if set, else benchmarks/gpu-results/
#
# Needs a CUDA machine with torch (CUDA build), torchmetrics, einops and numpy importable by
# $PYTHON (default: .venv/bin/python if present, else python3); the package is used from src/.
# Steps (each writes a file; the script stops at the first failure):
#   1. device.txt     nvidia-smi name, memory, driver; torch and CUDA versions
#   2. checks.txt     benchmarks/gpu_checks.py: every key vs the float64 reference on CPU for
#                     float16/bfloat16/float32/float64 inputs, no host-device sync in update,
#                     K = 50,000 and d = 4,096 computes and matches a float64 two-pass on the GPU
#   3. benchmark.md   benchmarks/metrics.py --device cuda on the issue's sizes (floor, ours,
#                     two-pass baseline), then K = 50,000, d = 4,096 (floor and ours)
#   4. losses.md      benchmarks/losses.py: overhead of each regularizer on a ResNet-18 training
#                     step at CIFAR size (batch 128, bf16 autocast, torch.compile row included),
#                     and the regularizer's cost against a linear head + cross-entropy
#   5. heads.md       benchmarks/heads.py --device cuda: heads vs nn.Linear, NearestETFHead's
#                     share of a ResNet-18 step at batch 128
#   6. recipes.md     benchmarks/recipes.py: ResNet-18 training throughput with and without the
#                     collapse evaluation (random CIFAR-sized images)
# Steps 1-3 stop the script at the first failure; steps 4-6 each have a time limit and a failure
# is recorded in their file, so that one slow step does not cost the others.
set -euo pipefail
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
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY' | tee "$OUT_DIR/device.txt"
import torch, torchmetrics
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}, torchmetrics {torchmetrics.__version__}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT_DIR/device.txt" || true

"$PYTHON" benchmarks/gpu_checks.py --device cuda --large 100000x4096x50000 2>&1 | tee "$OUT_DIR/checks.txt"

{
  "$PYTHON" benchmarks/metrics.py --device cuda --repeats 3 \
    --sizes 20000x1024x1000,50000x256x10000,100000x4096x100
  echo
  "$PYTHON" benchmarks/metrics.py --device cuda --repeats 2 --methods floor,ours \
    --sizes 100000x4096x50000
} 2>&1 | tee "$OUT_DIR/benchmark.md"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee "$OUT_DIR/$name"
  if ! timeout "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$name"; then
    echo "== $name: failed or ran past ${limit} s" | tee -a "$OUT_DIR/$name"
  fi
}
step losses.md 180 "$PYTHON" benchmarks/losses.py --device cuda --model resnet18 \
  --batch-size 128 --amp bf16 --compile --rounds 7
step heads.md 150 "$PYTHON" benchmarks/heads.py --device cuda --resnet-batch 128 --skip-codes
step recipes.md 120 "$PYTHON" benchmarks/recipes.py --skip-default --device cuda \
  --threads none --train 10000 --test 2000
echo "results in $OUT_DIR"
