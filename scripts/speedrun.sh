#!/usr/bin/env bash
# The speedrun: from the raw TinyStories text to trained models and their bits per
# byte, on this machine, unattended; three contenders, each given the same minutes.
#
#   bash scripts/speedrun.sh [--minutes 30] [--arms ours,previous,baseline]
#                            [--config C] [--previous P] [--data PATH] [--skip-setup]
#
# Arms (trained in turn, each inside --minutes of wall time for its data,
# training and final evaluation, and all trained for the same time):
#   ours      configs/speedrun.yaml (--config): today's recipe
#   previous  configs/speedrun-adamw.yaml (--previous): the recipe before it
#   baseline  scripts/baseline_gpt2.py: nanoGPT's GPT-2 in PyTorch at ours' sizes,
#             on ours' token files (needs torch: setup installs it)
# The clock starts after setup (venv, packages). A tokenizer and token files are
# made once per tokenizer path, and each arm's evaluation cost is measured
# (`speedrun_report.py estimate`), all first; every arm then trains for the same
# seconds: its minutes less the longest data preparation and the dearest
# evaluation. The trainer fixes its step count from a short calibration, so the
# schedule ends on time. Every model is scored on
# tinystories_valid.txt (in domain), WikiText-2 and Gutenberg (out of domain).
# Results: logs/<ours' run>-compare/speedrun.md and .json; each arm's in arms/.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=30
DATA=""
ARMS=ours,previous,baseline
SETUP=1
CONFIG=configs/speedrun.yaml
PREVIOUS=configs/speedrun-adamw.yaml
usage() { sed -n '2,21p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --arms) ARMS="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --previous) PREVIOUS="$2"; shift 2 ;;
    --skip-setup) SETUP=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "speedrun: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$MINUTES" in
  ''|*[!0-9.]*|*.*.*) echo "speedrun: --minutes must be a positive number, got '$MINUTES'" >&2; exit 2 ;;
esac
IFS=, read -r -a ARM_LIST <<< "$ARMS"
for arm in "${ARM_LIST[@]}"; do
  case "$arm" in
    ours|previous|baseline) ;;
    *) echo "speedrun: unknown arm '$arm' in --arms (ours, previous, baseline)" >&2; exit 2 ;;
  esac
done
for f in "$CONFIG" $([[ ",$ARMS," == *,previous,* ]] && echo "$PREVIOUS"); do
  [ -f "$f" ] || { echo "speedrun: config $f not found" >&2; exit 2; }
done

if [ "$SETUP" = 1 ]; then
  if [[ ",$ARMS," == *,baseline,* ]]; then EXTRAS=torch bash scripts/setup.sh; else bash scripts/setup.sh; fi
fi
PY=.venv/bin/python
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
read_cfg() { $PY -c "from src.config import load_config; c = load_config('$1'); print($2)"; }
BUDGET_S=$(awk "BEGIN { print int($MINUTES * 60) }")
# the script's own folder (the runs' log folders are the trainer's)
LOG_DIR=$(read_cfg "$CONFIG" c.logging.dir)/$(read_cfg "$CONFIG" c.run_name)-compare
rm -rf "$LOG_DIR/arms" "$LOG_DIR/baseline"
mkdir -p "$LOG_DIR/arms"
mapfile -t FILES < <($PY -m src.data locate ${DATA:+--data "$DATA"})
echo "== [$(elapsed)s] corpus: ${FILES[*]}; arms: $ARMS, ${MINUTES} min each"

declare -A PREPARED=()  # tokenizer path -> seconds its data took
prepare() {  # the tokenizer and token files of config $1 (once per tokenizer path)
  local tok; tok=$(read_cfg "$1" c.data.tokenizer_path)
  if [ -z "${PREPARED[$tok]:-}" ]; then
    local t0; t0=$(elapsed)
    $PY -m src.tokenizer train --input "${FILES[@]}" --output "$tok" \
      --vocab-size "$(read_cfg "$1" c.model.vocab_size)"
    $PY -m src.data prepare --input "${FILES[@]}" --tokenizer "$tok" \
      --output "$(dirname "$(read_cfg "$1" c.data.train_path)")" --val-fraction 0.02
    PREPARED[$tok]=$(( $(elapsed) - t0 ))
  fi
  DATA_S=${PREPARED[$tok]}
}
train_seconds() {  # what is left of an arm's minutes after data ($1 s) and evaluation ($2 s)
  local s; s=$(( BUDGET_S - $1 - $2 ))
  if [ "$s" -lt 10 ]; then
    echo "speedrun: only ${s}s left for training after ${1}s of data and ${2}s" \
      "kept for evaluation; raise --minutes" >&2
    exit 2
  fi
  echo "$s"
}

# Every arm trains for the same seconds: its minutes less the longest data
# preparation and the dearest evaluation of the arms (each measured first).
DATA_MAX=0 EVAL_MAX=0
declare -A EVAL_EST=() EST_TOOK=()
for arm in "${ARM_LIST[@]}"; do
  cfg=$CONFIG; [ "$arm" = previous ] && cfg=$PREVIOUS
  prepare "$cfg"
  [ "$DATA_S" -le "$DATA_MAX" ] || DATA_MAX=$DATA_S
  flag=""; [ "$arm" = baseline ] && flag=--baseline
  E0=$(elapsed)
  EVAL_EST[$arm]=$($PY scripts/speedrun_report.py estimate --config "$cfg" $flag)
  EST_TOOK[$arm]=$(( $(elapsed) - E0 ))
  [ "${EVAL_EST[$arm]}" -le "$EVAL_MAX" ] || EVAL_MAX=${EVAL_EST[$arm]}
done
TRAIN_S=$(train_seconds "$DATA_MAX" "$EVAL_MAX")
TRAIN_MIN=$(awk "BEGIN { print $TRAIN_S / 60 }")
echo "== [$(elapsed)s] every arm trains ${TRAIN_S}s: ${BUDGET_S}s less ${DATA_MAX}s of data" \
  "and ${EVAL_MAX}s kept for the dearest evaluation (estimates: $(for a in "${!EVAL_EST[@]}"; do printf '%s %ss ' "$a" "${EVAL_EST[$a]}"; done))"

RESULTS=()
for arm in "${ARM_LIST[@]}"; do
  A0=$(elapsed) T0=$(elapsed)
  case "$arm" in
    ours|previous)
      cfg=$CONFIG; [ "$arm" = previous ] && cfg=$PREVIOUS
      echo "== [$(elapsed)s] $arm: $cfg, ${TRAIN_S}s of training"
      $PY -m src.train --config "$cfg" --overwrite --set "training.time_budget_minutes=$TRAIN_MIN"
      T1=$(elapsed)
      CKPT=$(read_cfg "$cfg" c.checkpoint.dir)/$(read_cfg "$cfg" c.run_name)/latest
      $PY scripts/speedrun_report.py score --checkpoint "$CKPT" --label "$arm ($cfg)" \
        --out "$LOG_DIR/arms/$arm.json" --train-seconds $(( T1 - T0 ))
      ;;
    baseline)
      echo "== [$(elapsed)s] baseline: nanoGPT-style GPT-2 in PyTorch, ${TRAIN_S}s of training"
      $PY scripts/baseline_gpt2.py --config "$CONFIG" --minutes "$TRAIN_MIN" \
        --out "$LOG_DIR/baseline"
      T1=$(elapsed)
      $PY scripts/speedrun_report.py score --baseline "$LOG_DIR/baseline" \
        --tokenizer "$(read_cfg "$CONFIG" c.data.tokenizer_path)" \
        --label "nanoGPT-style baseline" --out "$LOG_DIR/arms/baseline.json"
      ;;
  esac
  echo "== [$(elapsed)s] $arm: training took $(( T1 - T0 ))s of ${TRAIN_S}s," \
    "evaluation $(( $(elapsed) - T1 ))s of ${EVAL_EST[$arm]}s estimated"
  # its minutes: the data and its estimate, made up front, its training, evaluation
  USED=$(( $(elapsed) - A0 + DATA_MAX + ${EST_TOOK[$arm]} ))
  echo "speedrun: $arm: ${USED}s of its ${BUDGET_S}s (data ${DATA_MAX}s, training," \
    "evaluation)"
  RESULTS+=("$LOG_DIR/arms/$arm.json")
done
$PY scripts/speedrun_report.py table "${RESULTS[@]}" --out-dir "$LOG_DIR"
echo "speedrun: $(elapsed)s in all for ${#ARM_LIST[@]} arm(s) of ${BUDGET_S}s"
