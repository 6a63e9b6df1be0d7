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
timeout 300 python benchmarks/bench_calibration.py --model random --hidden 4096 --layers 2 --samples 32 \
    --seq-len 2048 --batch-size 4 --dtype bfloat16 --device cuda --repeats 3 \
    --out "$OUT/calibration_cuda.json" 2>&1 | tee "$OUT/calibration_cuda.txt" | tail -12
# 3) the native extension built there with nvcc for sm_90; its CUDA ops against the CPU ones; decomposition of
#    LLaMA-2-7B-shaped layers vs the PEFT-style loop (fp32)
CORDA_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 python setup.py build_ext --inplace \
    > "$OUT/build_ext.txt" 2>&1; tail -2 "$OUT/build_ext.txt"
python -c "from corda_fast.ops import native; print('extension', native.status())" | tee -a "$OUT/build_ext.txt"
timeout 120 python -m pytest -q tests/test_native.py 2>&1 | tee "$OUT/native_tests.txt" | tail -3
timeout 300 python benchmarks/bench_decompose.py --device cuda --shapes 4096x4096 11008x4096 4096x11008 \
    --layers-per-shape 2 --repeats 2 --modes kpm --out "$OUT/decompose_cuda.json" 2>&1 \
    | tee "$OUT/decompose_cuda.txt" | tail -8
# 4) the fused training layer: its tests with the compiled kernel, then layer fwd+bwd and a training step vs PEFT
#    LoRA at the issue's shapes (bf16, K, N in {4096, 11008}, 8k/16k tokens, r in {16, 64, 128})
timeout 180 python -m pytest -q tests/test_fused.py 2>&1 | tee "$OUT/fused_tests.txt" | tail -3
timeout 400 python benchmarks/bench_fused.py --device cuda --dtype bfloat16 --shapes 4096x4096 4096x11008 11008x4096 \
    --tokens 8192 16384 --ranks 16 64 128 --train-hidden 2048 --train-layers 8 --train-batch 4 --train-seq 2048 \
    --repeats 10 --out "$OUT/fused_cuda.json" 2>&1 | tee "$OUT/fused_cuda.txt" | tail -30
# 5) distributed calibration scaling on the device machine's 16 CPU cores (gloo processes, one thread each), and
#    the quantized-base tests (skip if bitsandbytes / torchao are not installed there)
timeout 240 python benchmarks/bench_distributed.py --worlds 1 2 4 8 --repeats 1 --samples 128 \
    --out "$OUT/distributed_cpu16.json" 2>&1 | tee "$OUT/distributed_cpu16.txt" | tail -8
timeout 120 python -m pytest -q tests/test_quant.py tests/test_distributed.py 2>&1 | tee "$OUT/quant_dist_tests.txt" | tail -3
# 6) models bigger than the device: sequential onloading (peak CUDA memory of one block + statistics + workspace)
#    and the offload tests (disk-offloaded model equal to the in-memory one; host memory of the whole run)
timeout 300 python -m pytest -q tests/test_offload.py 2>&1 | tee "$OUT/offload_tests.txt" | tail -3
