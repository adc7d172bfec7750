#!/usr/bin/env bash
# One prepared script for a machine with a GPU: run from the checkout with PYTHONPATH (no install),
# on artifacts exported elsewhere and carried along. Under 8 minutes.
#
#   bash scripts/gpu_check.sh [ARTIFACT_DIR] [OUT_DIR]
#
# 1. the GPU-marked tests (gpu, tensorrt); 2. sampling and density benchmarks at batch 1, 64, 1024 for
# each backend present (torch eager fp32 / bf16, torch.compile, ONNX Runtime, TensorRT fp32 / fp16),
# written as JSON and a markdown table that also lists what was skipped and why.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ARTIFACT="${1:-artifacts/gpu/digits-acf-l2}"
OUT="${2:-${OUT:-gpu-results}}"
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
echo "== GPU-marked tests"
ACF_GPU_ARTIFACT="$ARTIFACT" timeout 240 python3 -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests/test_gpu.py tests/test_tensorrt_real.py 2>&1 | tail -15
echo "== GPU benchmarks"
timeout 300 python3 scripts/gpu_bench.py "$ARTIFACT" --out "$OUT" --batch 1,64,1024
cat "$OUT/gpu_bench.md"
