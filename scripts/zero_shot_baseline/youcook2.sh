#!/usr/bin/env bash
# Zero-shot baseline: LaBSE student trained on English captions only, on multilingual YouCook2.
# FEATURE=s3d (default) or FEATURE=clip. Writes runs/youcook2/$FEATURE/zero_shot/seed$SEED/.
# Environment: SEED (default 0; the run folder is seed$SEED), FEATURE, PY (default python).
# Extra arguments go to train.py, e.g. --set data.num_workers=8 or -d cuda:1.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=${SEED:-0}
exec "${PY:-python}" train.py -c "configs/youcook2/${FEATURE:-s3d}/zero_shot.json" --run-id "seed${SEED}" --seed "${SEED}" "$@"
