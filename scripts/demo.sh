#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: CorDA-KPM on SmolLM2-135M with offline Python docs text.
# Extra arguments go to `python -m corda_fast demo` (e.g. --mode ipm --rank 32 --samples 128).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m corda_fast demo --overwrite "$@"
