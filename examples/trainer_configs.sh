#!/usr/bin/env bash
# CorDA for LLaMA-Factory and axolotl: `python -m corda_fast init` writes a residual base, an initial adapter and
# configs each trainer loads as-is; the trainers then train the CorDA adapter like any LoRA they resume.
#   bash examples/trainer_configs.sh [MODEL_DIR] [DATA] [OUT]
# Defaults: the demo model (SmolLM2-135M), a small text file of offline documentation, ./corda_trainers.
set -euo pipefail
MODEL=${1:-smollm2}
DATA=${2:-}
OUT=${3:-corda_trainers}
PY=${PYTHON:-python}
if [ -z "$DATA" ]; then
  DATA=$(mktemp --suffix .txt)
  "$PY" -c "from corda_fast import demo; print(demo.builtin_text()[:200000])" > "$DATA"
fi
"$PY" -m corda_fast init --model "$MODEL" --data "$DATA" --concatenate --samples 16 --seq-len 128 --rank 8 \
  --mode ipm --out "$OUT" --overwrite --quiet
echo
echo "== $OUT/llamafactory.yaml (set dataset/template, then: llamafactory-cli train $OUT/llamafactory.yaml)"
grep -vE '^#' "$OUT/llamafactory.yaml" | sed -n '1,12p'
echo
echo "== $OUT/axolotl.yaml (set datasets, then: axolotl train $OUT/axolotl.yaml)"
grep -vE '^#' "$OUT/axolotl.yaml" | sed -n '1,10p'
