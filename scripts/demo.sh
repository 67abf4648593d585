#!/usr/bin/env bash
# The embedded default, shown by `make demo`: on Multi-Toy with tiny locally built encoders,
# train (or reuse) the three English-input teachers, train a translate-train student and a C2KD
# student, evaluate the C2KD checkpoint with test.py, and print both students side by side.
# Each stage prints one line; its whole output goes to runs/toy/demo_logs/ (and the run folder's
# cout.txt), and is shown when the stage fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGS=runs/toy/demo_logs
mkdir -p "$LOGS"

stage() {  # stage "what it does" LOG_NAME command...
  local what=$1 log="$LOGS/$2.log"
  shift 2
  echo "$what (log: $log)"
  if ! "$@" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "failed: $what; the whole output is in $log" >&2
    exit 1
  fi
}

stage "building the Multi-Toy data and tiny encoders" toy $PY -m utils.tiny_encoders --root cache
n=0
for teacher in xlmr mbert distiluse; do  # trained once, then reused (or resumed) by train.py
  n=$((n + 1))
  stage "teacher $n of 3 ($teacher)" "teacher_$teacher" $PY train.py -c "configs/toy/teacher_$teacher.json" --run-id seed0
done
rm -rf runs/toy/translate_train/demo runs/toy/c2kd/demo
stage "translate-train student" translate_train $PY train.py -c configs/toy/translate_train.json --run-id demo
stage "C2KD student" c2kd $PY train.py -c configs/toy/c2kd.json --run-id demo
stage "evaluating the C2KD student with test.py" test $PY test.py -r runs/toy/c2kd/demo/latest.pt
$PY -m utils.report --out reports/toy_demo --recall 1,5,10 \
  --method "Translate-train=runs/toy/translate_train/demo" \
  --method "C2KD=runs/toy/c2kd/demo"
