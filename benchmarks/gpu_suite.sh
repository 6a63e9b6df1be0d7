#!/usr/bin/env bash
# Everything GPU-relevant in one short device call (≤ 8 minutes on one H200), most valuable first.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR             # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run OUT_DIR   # the same steps on CPU with tiny shapes (CI runs this)
#
# Steps (each under its own timeout; the limits add up to at most 440 s, so with each step's 5 s kill grace the
# whole run stays under 480 s):
#   env         versions, registered kernels, the device
#   kernels     the Triton kernels compiled (not interpreted) and the ops against float64 references
#   native      the C++/CUDA extension built with nvcc for sm_90, its kernels against the torch reference
#   calibration statistics at LLaMA-2-7B-shaped layers (hidden 4096, MLP 11008, bf16): plain forward, ours, PEFT's
#               hook at batch size 1
#   fused       the fused LoRA layer fwd+bwd and a training step vs PEFT LoRA (bf16)
#   decompose   decomposition of 7B-shaped layers: PEFT-style loop vs ours (torch and native)
#   experts     one MoE block with 8 / 32 / 128 experts: routed statistics and decomposition, batched vs per expert
#   memory      device peak of streaming and onloading (a 2048-wide bf16 Llama) next to plan_memory's prediction
# Every figure lands in OUT_DIR with its environment (each benchmark's JSON carries one; env.json; steps.tsv holds
# each step's exit code, seconds and limit). The suite imports nothing the GPU machine lacks: the dry run blocks
# `datasets`, `trl`, `bitsandbytes` and `torchao` to prove it. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n 2,22p "$0"; exit 0 ;;
        *) OUT=$arg ;;
    esac
done
OUT=${OUT:-benchmarks/results/gpu_suite}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export CORDA_FAST_COMMIT=${CORDA_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

if [ "$DRY" = 1 ]; then
    DEV=cpu
    export TRITON_INTERPRET=1
    block="$OUT/dry_run_site"
    mkdir -p "$block"
    cat > "$block/sitecustomize.py" <<'EOF'
# gpu_suite.sh --dry-run: the GPU machine has none of these packages. They look absent here too (a find_spec
# answers None, an import raises ModuleNotFoundError), so a step that needs one fails as it would there.
import importlib.machinery

_BLOCKED = ("datasets", "trl", "bitsandbytes", "torchao")
_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _find_spec_without_blocked(cls, name, path=None, target=None):
    if name.split(".")[0] in _BLOCKED:
        return None
    return _find_spec(cls, name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_find_spec_without_blocked)
EOF
    export PYTHONPATH="$block:$PYTHONPATH"
else
    DEV=cuda
    export TRITON_INTERPRET=0
fi

printf "step\trc\tseconds\tlimit\n" > "$OUT/steps.tsv"
FAILED=0
BUDGET=0
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    BUDGET=$((BUDGET + limit))
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$secs" "$limit" >> "$OUT/steps.tsv"
    if [ "$rc" != 0 ]; then FAILED=$((FAILED + 1)); fi
    echo "== $name: exit $rc in ${secs}s (limit ${limit}s)"
    tail -n 4 "$OUT/$name.txt" | sed 's/^/   /'
}

if [ "$DRY" = 1 ]; then
    step env 30 "$PY" -m corda_fast env
    cp "$OUT/env.txt" "$OUT/env.json"
    step kernels 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_triton_kernel.py \
        -k "not float16 and not bfloat16 and not autotuning"
    step native 30 "$PY" -m pytest -q -p no:cacheprovider tests/test_native.py -k "not decompose_native_equals"
    step calibration 60 "$PY" benchmarks/bench_calibration.py --model random --hidden 64 --layers 1 --samples 4 \
        --seq-len 32 --batch-size 2 --dtype float32 --device cpu --repeats 1 --variants forward ours forward_bs1 peft \
        --out "$OUT/calibration.json"
    step fused 60 "$PY" benchmarks/bench_fused.py --device cpu --dtype float32 --shapes 64x96 --tokens 64 --ranks 8 \
        --train-hidden 64 --train-layers 1 --train-batch 2 --train-seq 16 --train-rank 4 --repeats 2 \
        --out "$OUT/fused.json"
    step decompose 60 "$PY" benchmarks/bench_decompose.py --device cpu --shapes 48x40 40x48 --layers-per-shape 2 \
        --rank 4 --repeats 1 --modes kpm --out "$OUT/decompose.json"
    step experts 60 "$PY" benchmarks/bench_experts.py --device cpu --experts 8 --repeats 1 --out "$OUT/experts.json"
    step memory 50 "$PY" benchmarks/bench_memory_gpu.py --device cpu --hidden 64 --layers 2 --samples 4 --seq-len 16 \
        --batch-size 2 --out "$OUT/memory.json"
else
    step env 15 "$PY" -m corda_fast env
    cp "$OUT/env.txt" "$OUT/env.json"
    step kernels 65 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_triton_kernel.py \
        tests/test_fused.py -x
    step native 135 env CORDA_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 bash -c "'$PY' setup.py build_ext --inplace > '$OUT/build_ext.txt' 2>&1; tail -n 3 '$OUT/build_ext.txt';
            CORDA_FAST_REQUIRE_NATIVE=1 '$PY' -m pytest -q -p no:cacheprovider tests/test_native.py"
    step calibration 60 "$PY" benchmarks/bench_calibration.py --model random --hidden 4096 --layers 2 --samples 16 \
        --seq-len 2048 --batch-size 4 --dtype bfloat16 --device cuda --repeats 3 --variants forward ours peft \
        --out "$OUT/calibration.json"
    step fused 55 "$PY" benchmarks/bench_fused.py --device cuda --dtype bfloat16 --shapes 4096x4096 4096x11008 \
        --tokens 8192 --ranks 16 64 --train-hidden 2048 --train-layers 4 --train-batch 4 --train-seq 2048 --repeats 5 \
        --out "$OUT/fused.json"
    step decompose 55 "$PY" benchmarks/bench_decompose.py --device cuda --shapes 4096x4096 11008x4096 \
        --layers-per-shape 2 --repeats 2 --modes kpm --out "$OUT/decompose.json"
    step experts 25 "$PY" benchmarks/bench_experts.py --device cuda --experts 8 32 128 --repeats 1 \
        --out "$OUT/experts.json"
    step memory 30 "$PY" benchmarks/bench_memory_gpu.py --device cuda --hidden 2048 --layers 8 \
        --out "$OUT/memory.json"
fi

echo "== $FAILED step(s) failed; limits add up to ${BUDGET}s; results in $OUT (device: $DEV)"
if [ "$BUDGET" -gt 440 ]; then
    echo "gpu_suite.sh: the step limits add up to ${BUDGET}s, over the 440 s that keeps one run under 8 minutes" >&2
    FAILED=$((FAILED + 1))
fi
exit "$FAILED"
