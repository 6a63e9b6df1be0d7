#!/usr/bin/env bash
# Everything GPU-relevant in one device call (no network needed: torch, triton, transformers, peft preinstalled).
#   bash benchmarks/gpu_suite.sh OUT_DIR
# 1) the Triton kernel and the CUDA paths, compiled (not interpreted), against float64 references;
# 2) calibration cost at LLaMA-2-7B-shaped layers (hidden 4096, MLP 11008, bf16): plain forward, ours (all at
#    once and streaming), PEFT's hook at batch size 1; statistic memory and CUDA peak memory.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
python -m corda_fast env | tee "$OUT/env.json"
timeout 180 python -m pytest -q tests/test_triton_kernel.py tests/test_ops.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -3
CORDA_FAST_TRITON_AUTOTUNE=0 timeout 120 python -m pytest -q tests/test_triton_kernel.py 2>&1 \
    | tee "$OUT/gpu_tests_fixed_tiles.txt" | tail -2
timeout 300 python benchmarks/bench_calibration.py --model random --hidden 4096 --layers 2 --samples 32 \
    --seq-len 2048 --batch-size 4 --dtype bfloat16 --device cuda --repeats 3 \
    --out "$OUT/calibration_cuda.json" 2>&1 | tee "$OUT/calibration_cuda.txt" | tail -12
