#!/usr/bin/env bash
# One Multi-Toy run that can be repeated:  bash scripts/toy/train.sh CONFIG RUN_FOLDER SEED
# An unfinished run resumes in its folder. Otherwise train.py runs it: it reuses a finished run of
# the same config, refuses one of another config or in progress, and replaces one that failed
# before its first checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
config=$1 folder=$2 seed=$3
if [ "$($PY -m utils.experiment state "$folder")" = resume ]; then
  exec $PY train.py -r "$folder/latest.pt" --run-id "$(basename "$folder")"
fi
exec $PY train.py -c "$config" --run-id "$(basename "$folder")" --seed "$seed"
