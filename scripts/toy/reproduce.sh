#!/usr/bin/env bash
# The paper's pipeline on Multi-Toy, with every choice made on the validation split:
# 1. three English-only toy teachers, trained on the English-rich file (one seed);
# 2. zero-shot, translate-train and C2KD students, SEEDS each; C2KD's λ is the one of BALANCES with
#    the best mean validation R@1 over the non-English languages;
# 3. the teacher analysis (C2KD from each teacher alone, at that λ) and the English-rich control,
#    ANALYSIS_SEEDS each (default: SEEDS);
# 4. every run evaluated once on the test split (test.py) after training, and the report
#    (reports/toy/): tables, differences against translate-train paired by seed, validation learning curves;
#    and the C2KD rows paired with the English-rich control (reports/toy/against_control/).
# It can be re-run: train.py reuses a finished run of the same config and resumes an interrupted one
# in place; delete runs/toy to start over. Training runs one process at a time; JOBS=2 runs two.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2 3 4 5 6 7"}
ANALYSIS_SEEDS=${ANALYSIS_SEEDS:-$SEEDS}  # of the teacher analysis and the English-rich control
BALANCES=${BALANCES:-"0.2 0.5"}
JOBS=${JOBS:-1}
# Each of the JOBS processes gets its share of the cores, so that they do not slow each other down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
TEST=cache/multi_toy/multi_toy_test.pkl
LOGS=runs/toy/logs
SECONDS=0

$PY -m utils.tiny_encoders --root cache >/dev/null
mkdir -p "$LOGS"

train() {  # train CONFIG NAME SEED [train.py options]: one run, then its evaluation on the test split
  local config=$1 name=$2 seed=$3 log="$LOGS/$2.seed$3.log"
  shift 3
  echo "training $name seed $seed"
  local checkpoint="runs/toy/$name/seed$seed/latest.pt" tested="runs/toy/$name/test_runs/seed$seed"
  { $PY train.py -c "configs/toy/$config.json" --set "name=$name" --run-id "seed$seed" --seed "$seed" "$@" &&
    if [ "$tested/run.json" -nt "$checkpoint" ] && grep -q '"COMPLETED"' "$tested/run.json"; then
      echo "$tested: this checkpoint is already evaluated"
    else
      rm -rf "$tested" && $PY test.py -r "$checkpoint" --run-id "seed$seed" --set "data.eval_path=$TEST"
    fi
  } >>"$log" 2>&1 || { tail -n 20 "$log" >&2; exit 1; }
}

in_parallel() {  # each line of stdin is one command; JOBS of them at a time, stopping at the first failure
  xargs -P "$JOBS" -I{} bash -c '{} || exit 255'
}
export -f train
export PY LOGS TEST

for teacher in xlmr mbert distiluse; do echo "train teacher_$teacher teacher_$teacher 0"; done | in_parallel

{
  for seed in $SEEDS; do
    for method in zero_shot translate_train; do echo "train $method $method $seed"; done
    for b in $BALANCES; do echo "train c2kd c2kd_balance$b $seed --balance $b"; done
  done
} | in_parallel

# λ: the best mean over seeds of the last epoch's validation R@1 averaged over the non-English languages.
BALANCE=$($PY - $BALANCES <<EOF
import statistics, sys
from utils.results import load_run, run_value, languages_of, Method
def score(b):
    runs = [load_run(f"runs/toy/c2kd_balance{b}/seed{s}") for s in "$SEEDS".split()]
    langs = languages_of([Method(b, runs)], "t2v")
    return statistics.fmean(run_value(r, "avg_no_en", langs, "t2v", 1) for r in runs)
scores = {b: score(b) for b in sys.argv[1:]}
print(max(scores, key=scores.get))
print(" ".join(f"λ={b}: {v:.2f}" for b, v in scores.items()), file=sys.stderr)
EOF
)
echo "λ = $BALANCE, chosen on the validation split"

# The teacher analysis and the English-rich control, seed by seed.
{
  for seed in $ANALYSIS_SEEDS; do
    for teacher in xlmr mbert distiluse; do echo "train c2kd_$teacher c2kd_$teacher $seed --balance $BALANCE"; done
    echo "train translate_train_english translate_train_english $seed"
  done
} | in_parallel

STUDENTS="zero_shot translate_train translate_train_english c2kd_balance$BALANCE c2kd_xlmr c2kd_mbert c2kd_distiluse"
seeds_of() {  # the seeds a method was trained with: the teacher analysis and the control use ANALYSIS_SEEDS
  case $1 in c2kd_balance*) echo "$SEEDS" ;; c2kd_*|translate_train_english) echo "$ANALYSIS_SEEDS" ;; *) echo "$SEEDS" ;; esac
}
runs_of() {  # runs_of NAME [SUBFOLDER]: comma-separated run folders of one method, one per seed
  local dirs=()
  for seed in $(seeds_of "$1"); do dirs+=("runs/toy/$1/${2:-}seed$seed"); done
  (IFS=,; echo "${dirs[*]}")
}
label() {
  case $1 in
    zero_shot) echo "Zero-shot" ;; translate_train) echo "Translate-train" ;;
    translate_train_english) echo "Translate-train + English-rich data" ;;
    c2kd_balance*) echo "C2KD (3 teachers, max)" ;; c2kd_*) echo "C2KD (${1#c2kd_} teacher alone)" ;;
  esac
}
rows=() curves=() compared=()
for name in $STUDENTS; do
  rows+=(--method "$(label "$name")=$(runs_of "$name" test_runs/)")
  curves+=(--curve "$(label "$name")=$(runs_of "$name")")
  case $name in zero_shot|translate_train) ;; *) compared+=(--compare "$(label "$name")") ;; esac
done
for teacher in xlmr mbert distiluse; do
  rows+=(--method "Teacher $teacher (English only)=runs/toy/teacher_$teacher/test_runs/seed0")
done
# The paired differences leave zero-shot out: its -54 would squash the plot's scale.
$PY -m utils.report --out reports/toy --recall 1,5,10 --baseline Translate-train "${compared[@]}" "${rows[@]}" \
  "${curves[@]}"
# Does distillation beat simply training on more English? Every C2KD row against the English-rich control.
control_rows=()
for name in translate_train_english c2kd_balance$BALANCE c2kd_xlmr c2kd_mbert c2kd_distiluse; do
  control_rows+=(--method "$(label "$name")=$(runs_of "$name" test_runs/)")
done
$PY -m utils.report --out reports/toy/against_control --recall 1 --baseline "$(label translate_train_english)" \
  "${control_rows[@]}" >/dev/null
echo "C2KD against the English-rich control, paired by seed: reports/toy/against_control/table.md"
echo "λ = $BALANCE (chosen on the validation split); seeds $SEEDS (teacher analysis and control: $ANALYSIS_SEEDS);" \
     "$((SECONDS / 60)) min $((SECONDS % 60)) s in all"
