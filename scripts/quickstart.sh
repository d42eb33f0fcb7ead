#!/usr/bin/env bash
# The whole pipeline on a fresh machine, in about five minutes on two CPU cores
# once set up (setting up takes a few minutes more):
# set up, find the corpus, train a tokenizer, prepare token files, train the
# quick-start model, and print samples from it.
#
#   bash scripts/quickstart.sh [--data PATH] [--config configs/quickstart.yaml] [--skip-setup]
#
# --data takes a file, a folder or a glob of .txt files (TinyStories format: stories
# separated by '<|endoftext|>' lines). Without it, data/raw/ and then ../shared/data/
# are searched; online, `python -m src.data download --output
# data/raw/tinystories_train.txt` fetches TinyStories.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/quickstart.yaml
DATA=""
SETUP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --skip-setup) SETUP=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ "$SETUP" = 1 ] && bash scripts/setup.sh
PY=.venv/bin/python
read_cfg() { $PY -c "from src.config import load_config; c = load_config('$CONFIG'); print($1)"; }
VOCAB=$(read_cfg c.model.vocab_size)
TOKENIZER=$(read_cfg c.data.tokenizer_path)
DATASET=$(dirname "$(read_cfg c.data.train_path)")
RUN=$(read_cfg c.run_name)

mapfile -t FILES < <($PY -m src.data locate ${DATA:+--data "$DATA"})
echo "== corpus: ${FILES[*]}"
echo "== tokenizer: vocab $VOCAB -> $TOKENIZER"
$PY -m src.tokenizer train --input "${FILES[@]}" --output "$TOKENIZER" --vocab-size "$VOCAB"
echo "== token files -> $DATASET"
$PY -m src.data prepare --input "${FILES[@]}" --tokenizer "$TOKENIZER" --output "$DATASET"
echo "== training $CONFIG"
$PY -m src.train --config "$CONFIG" --overwrite
echo "== samples"
$PY -m src.inference --checkpoint "checkpoints/$RUN/latest" --max-tokens 80 \
  --temperature 0.8 --prompt "Once upon a time" --prompt "The little girl" --prompt "One day, a dog"
