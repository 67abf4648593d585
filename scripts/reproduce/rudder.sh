#!/usr/bin/env bash
# Reproduce the RUDDER results (teachers, then zero-shot, translate-train and C2KD with 3 seeds,
# then the table): see scripts/reproduce/pipeline.sh.
#   bash scripts/reproduce/rudder.sh
#   FEATURE=clip SEEDS="0 1 2" PY=.venv/bin/python bash scripts/reproduce/rudder.sh --set data.num_workers=8
# FEATURE=clip (default).
exec bash "$(dirname "$0")/pipeline.sh" rudder "${FEATURE:-clip}" "$@"
