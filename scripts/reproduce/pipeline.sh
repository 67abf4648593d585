#!/usr/bin/env bash
# The reproduction pipeline of one dataset, shared by scripts/reproduce/<dataset>.sh: the three
# teachers (seed 0), then zero-shot, translate-train and C2KD with every seed in SEEDS, then the
# table (mean ± sample std over seeds) with utils.report, written to runs/<dataset>/$FEATURE/report/.
#   bash scripts/reproduce/pipeline.sh DATASET FEATURE [train.py arguments...]
# The script can be re-run after an interruption, as each train.py command can: for its run folder
# (see python -m trainer.experiment state FOLDER), train.py trains a new run, resumes an unfinished
# run of the same config in place, reuses a finished run of the same config, replaces a run that
# failed before its first checkpoint (missing data or teacher), and stops the script with a one-line
# error for a run of another config (naming the keys that differ), a run in progress in another
# process, or a folder that is not a run. A teacher folder holding a latest.pt without a run.json
# is used as given weights (e.g. converted with utils.convert_checkpoint).
# Extra arguments go to every train.py call. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=$1
export FEATURE=$2
shift 2
SEEDS=${SEEDS:-"0 1 2"}
# The project's .venv (made by make) when it exists, else the active environment's python; the
# per-experiment scripts it calls inherit it.
if [ -z "${PY:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PY=${PY:-python}
RUNS="runs/$DATASET/$FEATURE"
DRY=${DRY_RUN:+echo}

run() {  # run SCRIPT RUN_FOLDER SEED [train.py arguments...]
  local script=$1 folder=$2 seed=$3
  shift 3
  echo "== $folder ($("$PY" -m trainer.experiment state "$folder"))"
  $DRY env SEED="$seed" bash "$script" "$@"
}

for teacher in xlmr mbert distill; do
  folder="$RUNS/teacher_$teacher/seed0"
  if [ "$("$PY" -m trainer.experiment state "$folder")" = weights ]; then
    echo "== teacher $teacher: using the given weights $folder/latest.pt"
  else
    run "scripts/teacher_training/$DATASET/$teacher.sh" "$folder" 0 "$@"
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
$DRY "$PY" -m utils.report \
  --method "Zero-shot=$(join "${zero_shot[@]}")" \
  --method "Translate-train=$(join "${translate_train[@]}")" \
  --method "C2KD=$(join "${c2kd[@]}")" \
  --recall 1,5,10 --out "$RUNS/report"
