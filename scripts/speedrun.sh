#!/usr/bin/env bash
# The 30-minute recipe: from the raw TinyStories text to a trained model and its
# validation bits per byte, on this machine's CPU, unattended.
#
#   bash scripts/speedrun.sh [--minutes 30] [--data PATH] [--config C] [--baseline] [--skip-setup]
#
# The clock starts after setup (venv, packages). Within --minutes it trains a
# tokenizer, writes the token files, trains configs/speedrun.yaml for whatever time
# is left (the trainer fixes its step count from a short calibration, so the
# cosine schedule ends on time), and evaluates the final checkpoint: bits per byte
# on tinystories_valid.txt (in domain) and on WikiText-2 and Gutenberg (out of
# domain). --baseline then trains the nanoGPT-style PyTorch baseline
# (scripts/baseline_gpt2.py) on the same token files for the same training time
# and scores both on the same texts. Results: logs/speedrun/speedrun.md (and .json).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=30
DATA=""
BASELINE=0
SETUP=1
CONFIG=configs/speedrun.yaml
EVAL_RESERVE_S=${SPEEDRUN_EVAL_RESERVE_S:-150}  # kept for the final evaluation
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --baseline) BASELINE=1; shift ;;
    --skip-setup) SETUP=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "speedrun: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$SETUP" = 1 ]; then
  if [ "$BASELINE" = 1 ]; then EXTRAS=torch bash scripts/setup.sh; else bash scripts/setup.sh; fi
fi
PY=.venv/bin/python
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
read_cfg() { $PY -c "from src.config import load_config; c = load_config('$CONFIG'); print($1)"; }
VOCAB=$(read_cfg c.model.vocab_size)
TOKENIZER=$(read_cfg c.data.tokenizer_path)
DATASET=$(dirname "$(read_cfg c.data.train_path)")
RUN=$(read_cfg c.run_name)
CKPT_DIR=$(read_cfg c.checkpoint.dir)/$RUN
LOG_DIR=$(read_cfg c.logging.dir)/$RUN

mapfile -t FILES < <($PY -m src.data locate ${DATA:+--data "$DATA"})
echo "== [$(elapsed)s] corpus: ${FILES[*]}"
$PY -m src.tokenizer train --input "${FILES[@]}" --output "$TOKENIZER" --vocab-size "$VOCAB"
$PY -m src.data prepare --input "${FILES[@]}" --tokenizer "$TOKENIZER" --output "$DATASET" \
  --val-fraction 0.02

TRAIN_S=$(awk "BEGIN { print int($MINUTES * 60 - $(elapsed) - $EVAL_RESERVE_S) }")
if [ "$TRAIN_S" -lt 10 ]; then
  echo "speedrun: only ${TRAIN_S}s left for training; raise --minutes" >&2
  exit 2
fi
TRAIN_MIN=$(awk "BEGIN { print $TRAIN_S / 60 }")
echo "== [$(elapsed)s] training $CONFIG for ${TRAIN_MIN} min"
$PY -m src.train --config "$CONFIG" --overwrite --set "training.time_budget_minutes=$TRAIN_MIN"
BASELINE_S=0
if [ "$BASELINE" = 1 ]; then
  echo "== [$(elapsed)s] baseline: nanoGPT-style GPT-2 in PyTorch, ${TRAIN_MIN} min of training"
  B0=$(elapsed)
  $PY scripts/baseline_gpt2.py --config "$CONFIG" --minutes "$TRAIN_MIN" --out "$LOG_DIR/baseline"
  BASELINE_S=$(( $(elapsed) - B0 ))
fi
echo "== [$(elapsed)s] evaluation and report"
$PY scripts/speedrun_report.py "$LOG_DIR" --checkpoint "$CKPT_DIR/latest"
echo "speedrun: $(( $(elapsed) - BASELINE_S ))s of the $(awk "BEGIN { print $MINUTES * 60 }")s" \
  "budget (data, training, evaluation; the baseline's ${BASELINE_S}s of training not counted)"
