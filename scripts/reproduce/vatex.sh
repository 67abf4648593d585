#!/usr/bin/env bash
# Reproduce the VATEX results (teachers, then zero-shot, translate-train and C2KD with 3 seeds,
# then the table): see scripts/reproduce/pipeline.sh.
#   bash scripts/reproduce/vatex.sh
#   FEATURE=clip SEEDS="0 1 2" PY=.venv/bin/python bash scripts/reproduce/vatex.sh --set data.num_workers=8
# FEATURE=clip (default).
exec bash "$(dirname "$0")/pipeline.sh" vatex "${FEATURE:-clip}" "$@"
