#!/usr/bin/env bash
# The embedded default, shown by `make demo`: on Multi-Toy with tiny locally built encoders,
# train (or reuse) the three English-input teachers, train a translate-train student and a C2KD
# student, evaluate the C2KD checkpoint with test.py, and print both students side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

$PY -m utils.tiny_encoders --root cache >/dev/null
for teacher in xlmr mbert distiluse; do  # trained once, then reused (or resumed) by train.py
  $PY train.py -c "configs/toy/teacher_$teacher.json" --run-id seed0
done
for method in translate_train c2kd; do
  rm -rf "runs/toy/$method/demo"
  $PY train.py -c "configs/toy/$method.json" --run-id demo
done
$PY test.py -r runs/toy/c2kd/demo/latest.pt
$PY -m utils.report --out reports/toy_demo --recall 1,5,10 \
  --method "Translate-train=runs/toy/translate_train/demo" \
  --method "C2KD=runs/toy/c2kd/demo"
