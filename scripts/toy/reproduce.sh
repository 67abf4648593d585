#!/usr/bin/env bash
# The paper's pipeline on Multi-Toy, with every choice made on the validation split:
# 1. three English-only toy teachers, trained on the English-rich file (one seed);
# 2. zero-shot, translate-train, the English-rich control and C2KD students, SEEDS each; C2KD's λ is
#    the one of BALANCES with the best mean validation R@1 over the non-English languages;
# 3. the teacher analysis: C2KD from each teacher alone, at that λ;
# 4. every student evaluated once on the test split (test.py), and the report (reports/toy/): tables,
#    differences against translate-train paired by seed, and the validation learning curves.
# It can be re-run: train.py reuses a finished run of the same config and resumes an interrupted one
# in place; delete runs/toy to start over. Training runs one process at a time; JOBS=2 runs two.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2 3"}
BALANCES=${BALANCES:-"0.2 0.5"}
JOBS=${JOBS:-1}
TEST=cache/multi_toy/multi_toy_test.pkl
LOGS=runs/toy/logs
SECONDS=0

$PY -m utils.tiny_encoders --root cache >/dev/null
mkdir -p "$LOGS"

train() {  # train CONFIG NAME SEED [train.py options]: one run, its output in $LOGS
  local config=$1 name=$2 seed=$3
  shift 3
  echo "training $name seed $seed"
  $PY train.py -c "configs/toy/$config.json" --set "name=$name" --run-id "seed$seed" --seed "$seed" "$@" \
    >"$LOGS/$name.seed$seed.log" 2>&1 || { tail -n 20 "$LOGS/$name.seed$seed.log" >&2; exit 1; }
}

in_parallel() {  # each line of stdin is one command; JOBS of them at a time, stopping at the first failure
  xargs -P "$JOBS" -I{} bash -c '{} || exit 255'
}
export -f train
export PY LOGS

for teacher in xlmr mbert distiluse; do echo "train teacher_$teacher teacher_$teacher 0"; done | in_parallel

{
  for seed in $SEEDS; do
    for method in zero_shot translate_train translate_train_english; do echo "train $method $method $seed"; done
    for b in $BALANCES; do echo "train c2kd c2kd_balance$b $seed --balance $b"; done
  done
} | in_parallel

# λ: the best mean over seeds of the last epoch's validation R@1 averaged over the non-English languages.
BALANCE=$($PY - $BALANCES <<EOF
import statistics, sys
from utils.report import load_run, run_value, languages_of, Method
def score(b):
    runs = [load_run(f"runs/toy/c2kd_balance{b}/seed{s}") for s in "$SEEDS".split()]
    langs = [l for l in languages_of([Method(b, runs)], "t2v") if l != "en"]
    return statistics.fmean(run_value(r, "avg_no_en", langs, "t2v", 1) for r in runs)
scores = {b: score(b) for b in sys.argv[1:]}
print(max(scores, key=scores.get))
print(" ".join(f"λ={b}: {v:.2f}" for b, v in scores.items()), file=sys.stderr)
EOF
)
echo "λ = $BALANCE, chosen on the validation split"

{
  for seed in $SEEDS; do
    for teacher in xlmr mbert distiluse; do echo "train c2kd_$teacher c2kd_$teacher $seed --balance $BALANCE"; done
  done
} | in_parallel

STUDENTS="zero_shot translate_train translate_train_english c2kd_balance$BALANCE c2kd_xlmr c2kd_mbert c2kd_distiluse"
echo "evaluating on the test split"
for name in teacher_xlmr teacher_mbert teacher_distiluse; do
  rm -rf "runs/toy/$name/test_runs/seed0"
  $PY test.py -r "runs/toy/$name/seed0/latest.pt" --run-id seed0 --set "data.eval_path=$TEST" >"$LOGS/$name.test.log" 2>&1
done
for name in $STUDENTS; do
  for seed in $SEEDS; do
    rm -rf "runs/toy/$name/test_runs/seed$seed"
    $PY test.py -r "runs/toy/$name/seed$seed/latest.pt" --run-id "seed$seed" --set "data.eval_path=$TEST" \
      >"$LOGS/$name.seed$seed.test.log" 2>&1
  done
done

runs_of() {  # runs_of NAME [SUBFOLDER]: comma-separated run folders of one method, one per seed
  local dirs=()
  for seed in $SEEDS; do dirs+=("runs/toy/$1/${2:-}seed$seed"); done
  (IFS=,; echo "${dirs[*]}")
}
label() {
  case $1 in
    zero_shot) echo "Zero-shot" ;; translate_train) echo "Translate-train" ;;
    translate_train_english) echo "Translate-train + English-rich data" ;;
    c2kd_balance*) echo "C2KD (3 teachers, max)" ;; c2kd_*) echo "C2KD (${1#c2kd_} teacher alone)" ;;
  esac
}
rows=() curves=()
for name in $STUDENTS; do
  rows+=(--method "$(label "$name")=$(runs_of "$name" test_runs/)")
  curves+=(--curve "$(label "$name")=$(runs_of "$name")")
done
for teacher in xlmr mbert distiluse; do
  rows+=(--method "Teacher $teacher (English only)=runs/toy/teacher_$teacher/test_runs/seed0")
done
$PY -m utils.report --out reports/toy --recall 1,5,10 --baseline Translate-train "${rows[@]}" "${curves[@]}"
echo "λ = $BALANCE (chosen on the validation split); seeds $SEEDS; $((SECONDS / 60)) min $((SECONDS % 60)) s in all"
