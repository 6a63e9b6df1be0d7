#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# the quantized-base tests (bitsandbytes 4-bit and torchao on CPU); torch stays pinned in the same command
python -m pip install --quiet "${CORDA_FAST_TORCH:-torch==2.13.0}" "bitsandbytes>=0.46" "torchao>=0.12"
# With a C++ compiler the native extension must have been built: its tests fail instead of skipping.
if command -v c++ >/dev/null 2>&1; then export CORDA_FAST_REQUIRE_NATIVE=1; fi
python -m pytest -q "$@"
