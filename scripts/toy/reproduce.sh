#!/usr/bin/env bash
# The paper's pipeline on Multi-Toy: three English-input teachers (translate-train), then the
# zero-shot, translate-train and C2KD students with 3 seeds each, then tables of R@1, R@5 and R@10
# (mean ± std over seeds) by method and language. It can be re-run: train.py reuses a finished run of the same
# config and resumes an interrupted one in place; delete runs/toy to start over.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}

$PY -m utils.tiny_encoders --root cache >/dev/null

for teacher in xlmr mbert distiluse; do
  $PY train.py -c "configs/toy/teacher_$teacher.json" --run-id seed0 --seed 0
done
for method in zero_shot translate_train c2kd; do
  for seed in $SEEDS; do
    $PY train.py -c "configs/toy/$method.json" --run-id "seed$seed" --seed "$seed"
  done
done

runs_of() {  # comma-separated run folders of one method, one per seed
  local dirs=()
  for seed in $SEEDS; do dirs+=("runs/toy/$1/seed$seed"); done
  (IFS=,; echo "${dirs[*]}")
}
$PY -m utils.report --out reports/toy --recall 1,5,10 \
  --method "Zero-shot=$(runs_of zero_shot)" \
  --method "Translate-train=$(runs_of translate_train)" \
  --method "C2KD=$(runs_of c2kd)"
