#!/usr/bin/env bash
# The reproduction pipeline of one dataset, shared by scripts/reproduce/<dataset>.sh: the three
# teachers (seed 0, skipped when their checkpoints exist), then zero-shot, translate-train and C2KD
# with every seed in SEEDS, then the table (mean ± sample std over seeds) with utils.report,
# written to runs/<dataset>/$FEATURE/report/.
#   bash scripts/reproduce/pipeline.sh DATASET FEATURE [train.py arguments...]
# A finished run (its run.json says COMPLETED) is skipped, so a script can be re-run after an
# interruption. Extra arguments go to every train.py call.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=$1
export FEATURE=$2
shift 2
SEEDS=${SEEDS:-"0 1 2"}
RUNS="runs/$DATASET/$FEATURE"

finished() { [ -f "$1/run.json" ] && grep -q '"status": "COMPLETED"' "$1/run.json"; }

run() {  # run SCRIPT RUN_FOLDER SEED [train.py arguments...]
  local script=$1 folder=$2 seed=$3
  shift 3
  if finished "$folder"; then
    echo "== $folder: finished, skipped"
    return
  fi
  if [ -e "$folder" ]; then
    echo "error: $folder exists but did not finish; remove it and run this script again" >&2
    exit 1
  fi
  echo "== $folder"
  SEED=$seed bash "$script" "$@"
}

for teacher in xlmr mbert distill; do
  if [ -f "$RUNS/teacher_$teacher/seed0/latest.pt" ]; then
    echo "== teacher $teacher: using $RUNS/teacher_$teacher/seed0/latest.pt"
  else
    run "scripts/teacher_training/$DATASET/$teacher.sh" "$RUNS/teacher_$teacher/seed0" 0 "$@"
  fi
done

zero_shot=() translate_train=() c2kd=()
for seed in $SEEDS; do
  run "scripts/zero_shot_baseline/$DATASET.sh" "$RUNS/zero_shot/seed$seed" "$seed" "$@"
  run "scripts/translate_train_baseline/$DATASET.sh" "$RUNS/translate_train/seed$seed" "$seed" "$@"
  run "scripts/c2kd/$DATASET.sh" "$RUNS/c2kd/seed$seed" "$seed" "$@"
  zero_shot+=("$RUNS/zero_shot/seed$seed")
  translate_train+=("$RUNS/translate_train/seed$seed")
  c2kd+=("$RUNS/c2kd/seed$seed")
done

join() { local IFS=,; echo "$*"; }
"${PY:-python}" -m utils.report \
  --method "Zero-shot=$(join "${zero_shot[@]}")" \
  --method "Translate-train=$(join "${translate_train[@]}")" \
  --method "C2KD=$(join "${c2kd[@]}")" \
  --recall 1,5,10 --out "$RUNS/report"
