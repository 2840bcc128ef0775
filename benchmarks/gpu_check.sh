#!/usr/bin/env bash
# GPU checks: compiled-kernel tests, then each benchmark (one JSON line each). Run on a CUDA machine:
#   bash benchmarks/gpu_check.sh
# Append one line per benchmark; keep each under a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
python -m pytest -q -m gpu -p no:cacheprovider tests || status=1
# NVFP4: every Triton==reference bit-exactness test, compiled (on CPU they run interpreted)
python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_nvfp4_triton.py || status=1
python benchmarks/nvfp4_quantize.py || status=1
# NVFP4 step time vs BF16; the JSON names the GEMM backend (te on Blackwell with TE >= 2.14)
python benchmarks/nvfp4_step.py --fp4-gemm auto --steps 5 || status=1
exit $status
