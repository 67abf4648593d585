#!/usr/bin/env bash
# Reproduce the multilingual YouCook2 results (teachers, then zero-shot, translate-train and C2KD with 3 seeds,
# then the table): see scripts/reproduce/pipeline.sh.
#   bash scripts/reproduce/youcook2.sh
#   FEATURE=clip SEEDS="0 1 2" PY=.venv/bin/python bash scripts/reproduce/youcook2.sh --set data.num_workers=8
# FEATURE=s3d (default) or FEATURE=clip.
exec bash "$(dirname "$0")/pipeline.sh" youcook2 "${FEATURE:-s3d}" "$@"
