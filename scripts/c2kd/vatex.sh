#!/usr/bin/env bash
# C2KD: LaBSE student distilled from the three English-input teachers, on VATEX.
# FEATURE=clip (default). Writes runs/vatex/$FEATURE/c2kd/seed$SEED/.
# Needs the teachers first: scripts/teacher_training/vatex/{xlmr,mbert,distill}.sh
# Environment: SEED (default 0; the run folder is seed$SEED), FEATURE, PY (default python).
# Extra arguments go to train.py, e.g. --set data.num_workers=8 or -d cuda:1.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-0}
exec "${PY:-python}" train.py -c "configs/vatex/${FEATURE:-clip}/c2kd.json" --run-id "seed${SEED}" --seed "${SEED}" "$@"
