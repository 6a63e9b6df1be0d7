#!/usr/bin/env bash
# Compile (not run) the CUDA sources of the native extension, on a machine without a GPU.
# Needs a CUDA build of torch in $PYTHON's environment and nvcc (CUDA_HOME); builds into a temporary folder and
# leaves the installed package alone. Example, with a CUDA torch in its own venv:
#   python3 -m venv /tmp/cudavenv && /tmp/cudavenv/bin/pip install torch==2.14.1 ninja pybind11 numpy setuptools
#   PYTHON=/tmp/cudavenv/bin/python CUDA_HOME=/usr/local/cuda bash scripts/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in $PY is CPU-only: need a CUDA build')"
CORDA_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py build_ext --build-temp "$out/t" --build-lib "$out/l" | grep -E "^corda_fast:|error" || true
so=$(ls "$out"/l/corda_fast/ops/_C*.so)
echo "CUDA build OK: $(basename "$so") ($(du -k "$so" | cut -f1) KiB), torch $("$PY" -c 'import torch; print(torch.__version__)')"
