#!/usr/bin/env bash
# GPU benchmark and GPU correctness checks of the neural collapse metrics, in one call.
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
echo "results in $OUT_DIR"
