#!/usr/bin/env bash
# Reproduce the Multi-MSRVTT results (teachers, then zero-shot, translate-train and C2KD with 3 seeds,
# then the table): see scripts/reproduce/pipeline.sh.
#   bash scripts/reproduce/msrvtt.sh
#   FEATURE=s3d SEEDS="0 1 2" PY=.venv/bin/python bash scripts/reproduce/msrvtt.sh --set data.num_workers=8
# FEATURE=clip (default) or FEATURE=s3d.
exec bash "$(dirname "$0")/pipeline.sh" msrvtt "${FEATURE:-clip}" "$@"
