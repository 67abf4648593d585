#!/usr/bin/env bash
# From a folder of videos and English captions to a multilingual benchmark and a C2KD student:
#   bash scripts/from_videos/run.sh VIDEOS CAPTIONS_JSON OUT [train.py arguments...]
# 1. data_loader.extract: features of every video, and OUT/data/<split> for each split of CAPTIONS_JSON
#    ({split: {video id: [English captions]}}; the splits "train" and "eval" are trained and evaluated on).
# 2. data_loader.translate: the English captions into LANGUAGES, into the same folders.
# 3. data_loader.check: both splits.
# 4. train.py: a translate-train teacher (configs/from_videos/teacher.json), then a C2KD student
#    distilled from it (configs/from_videos/c2kd.json), runs under OUT/runs.
# 5. utils.report: the per-language table of both, in OUT/report.
# Every step can be re-run after an interruption: finished videos, cached translations and
# finished runs are reused.
# Environment (defaults in brackets):
#   ENCODER [clip] or s3d; ENCODER_MODEL [openai/clip-vit-base-patch32; s3d: s3d_howto100m.pth]
#   EXTRACT_ARGS [] more data_loader.extract arguments, e.g. "--fps 1 --workers 8"
#   LANGUAGES (required) the target languages, e.g. "de fr sw"; MT_MODEL ["Helsinki-NLP/opus-mt-en-{lang}"]
#   TRANSLATE_ARGS [] more data_loader.translate arguments, e.g. "--num-beams 1"
#   TEACHER [xlm-roberta-base]; STUDENT [sentence-transformers/LaBSE]; SEED [0]; PY [.venv/bin/python or python]
set -euo pipefail
if [ $# -lt 3 ] || [ -z "${LANGUAGES:-}" ]; then
  echo "usage: LANGUAGES=\"de fr ...\" bash scripts/from_videos/run.sh VIDEOS CAPTIONS_JSON OUT [train.py arguments...]" >&2
  exit 2
fi
VIDEOS=$(realpath "$1") CAPTIONS=$(realpath "$2") OUT=$(realpath -m "$3")
shift 3
cd "$(dirname "$0")/../.."
if [ -z "${PY:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
PY=${PY:-python}
ENCODER=${ENCODER:-clip}
if [ "$ENCODER" = s3d ]; then FEATURE_KEY=s3d; DEFAULT_MODEL=s3d_howto100m.pth
else FEATURE_KEY=2d; DEFAULT_MODEL=openai/clip-vit-base-patch32; fi
PER_LANGUAGE_MARIAN='Helsinki-NLP/opus-mt-en-{lang}'
MT_MODEL=${MT_MODEL:-$PER_LANGUAGE_MARIAN}
SEED=${SEED:-0}
DATA="$OUT/data" RUNS="$OUT/runs"

echo "== extract ($ENCODER)"
status=0
# shellcheck disable=SC2086  # EXTRACT_ARGS holds several arguments
"$PY" -m data_loader.extract "$VIDEOS" "$DATA" --encoder "$ENCODER" --model "${ENCODER_MODEL:-$DEFAULT_MODEL}" \
  --captions "$CAPTIONS" ${EXTRACT_ARGS:-} || status=$?
if [ "$status" = 1 ]; then echo "== some videos failed (see $DATA/failed.tsv); going on without them"
elif [ "$status" != 0 ]; then exit "$status"; fi

echo "== translate into $LANGUAGES"
# shellcheck disable=SC2086
"$PY" -m data_loader.translate "$DATA/train" "$DATA/eval" --languages $LANGUAGES \
  --model "$MT_MODEL" ${TRANSLATE_ARGS:-}

echo "== check"
"$PY" -m data_loader.check "$DATA/train"
"$PY" -m data_loader.check "$DATA/eval"

DIM=$("$PY" -c 'import sys; from data_loader.readers import read_safe; print(read_safe(sys.argv[1]).feature_dim)' "$DATA/train")
COMMON=(--seed "$SEED" --run-id "seed$SEED"
  --set "data.train_path=$DATA/train" --set "data.eval_path=$DATA/eval"
  --set "data.feature_key=$FEATURE_KEY" --set "data.feature_dim=$DIM" --set "model.projection_dim=$DIM"
  --set "trainer.save_dir=$RUNS" --set "teachers.cache_dir=$OUT/teacher_cache")

echo "== translate-train teacher (${TEACHER:-xlm-roberta-base})"
"$PY" train.py -c configs/from_videos/teacher.json "${COMMON[@]}" \
  --set "model.text_encoder=${TEACHER:-xlm-roberta-base}" "$@"

echo "== C2KD student (${STUDENT:-sentence-transformers/LaBSE})"
"$PY" train.py -c configs/from_videos/c2kd.json "${COMMON[@]}" \
  --set "model.text_encoder=${STUDENT:-sentence-transformers/LaBSE}" \
  --set "teachers.checkpoints=[\"$RUNS/teacher/seed$SEED/latest.pt\"]" "$@"

echo "== table"
"$PY" -m utils.report --method "Translate-train teacher=$RUNS/teacher/seed$SEED" \
  --method "C2KD=$RUNS/c2kd/seed$SEED" --recall 1,5,10 --out "$OUT/report"
