#!/usr/bin/env bash
# The embedded default: train a translate-train model on Multi-Toy with the tiny LaBSE-shaped
# encoder, then evaluate it with test.py and print the per-language table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=runs/toy/translate_train/demo
rm -rf "$RUN"
$PY train.py -c configs/toy/translate_train.json --run-id demo
$PY test.py -r "$RUN/latest.pt"
