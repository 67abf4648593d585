#!/usr/bin/env bash
# Teacher for C2KD on multilingual YouCook2: translate-train with XLM-R (xlm-roberta-base) as text encoder.
# FEATURE=s3d (default) or FEATURE=clip. Writes runs/youcook2/$FEATURE/teacher_xlmr/seed$SEED/;
# configs/youcook2/$FEATURE/c2kd.json reads runs/youcook2/$FEATURE/teacher_xlmr/seed0/latest.pt.
# Environment: SEED (default 0; the run folder is seed$SEED), FEATURE, PY (default python).
# Extra arguments go to train.py, e.g. --set data.num_workers=8 or -d cuda:1.
set -euo pipefail
cd "$(dirname "$0")/../../.."
SEED=${SEED:-0}
exec "${PY:-python}" train.py -c "configs/youcook2/${FEATURE:-s3d}/teacher_xlmr.json" --run-id "seed${SEED}" --seed "${SEED}" "$@"
