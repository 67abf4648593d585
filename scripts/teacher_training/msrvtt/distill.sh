#!/usr/bin/env bash
# Teacher for C2KD on Multi-MSRVTT: translate-train with DistilUSE (sentence-transformers/distiluse-base-multilingual-cased-v2) as text encoder.
# FEATURE=clip (default) or FEATURE=s3d. Writes runs/msrvtt/$FEATURE/teacher_distill/seed$SEED/;
# configs/msrvtt/$FEATURE/c2kd.json reads runs/msrvtt/$FEATURE/teacher_distill/seed0/latest.pt.
# Environment: SEED (default 0; the run folder is seed$SEED), FEATURE, PY (default python).
# Extra arguments go to train.py, e.g. --set data.num_workers=8 or -d cuda:1.
set -euo pipefail
cd "$(dirname "$0")/../../.."
SEED=${SEED:-0}
exec "${PY:-python}" train.py -c "configs/msrvtt/${FEATURE:-clip}/teacher_distill.json" --run-id "seed${SEED}" --seed "${SEED}" "$@"
