#!/usr/bin/env bash
# Translate-train baseline: LaBSE student trained on every language, on Multi-MSRVTT.
# FEATURE=clip (default) or FEATURE=s3d. Writes runs/msrvtt/$FEATURE/translate_train/seed$SEED/.
# Environment: SEED (default 0; the run folder is seed$SEED), FEATURE, PY (default python).
# Extra arguments go to train.py, e.g. --set data.num_workers=8 or -d cuda:1.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-0}
exec "${PY:-python}" train.py -c "configs/msrvtt/${FEATURE:-clip}/translate_train.json" --run-id "seed${SEED}" --seed "${SEED}" "$@"
