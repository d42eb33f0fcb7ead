#!/usr/bin/env bash
# Prepare a dataset for training: train a tokenizer, then write token files.
#
#   DATASET=tinystories VOCAB_SIZE=8192 ./scripts/prepare_data.sh
#   DATASET=fineweb-edu VOCAB_SIZE=32000 MAX_TOKENS=200000000 ./scripts/prepare_data.sh
#   DATA=path/to/texts DATASET=mytexts VOCAB_SIZE=4096 ./scripts/prepare_data.sh
#
# DATASET   tinystories (default) | fineweb-edu | openwebtext | any name with DATA=
# DATA      local file, folder or glob (.txt/.jsonl/.parquet); for tinystories the
#           default is a local copy (data/raw/, then ../shared/data/), offline
# VOCAB_SIZE  tokenizer vocabulary (default 8192); MAX_TOKENS / MAX_DOCS cap hub data
# Writes the tokenizer to data/tokenizer-$VOCAB_SIZE/ and the token files to
# data/$DATASET-$VOCAB_SIZE/ (train.bin, val.bin, meta.json); point a config's `data` section there.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${DATASET:-tinystories}
VOCAB_SIZE=${VOCAB_SIZE:-8192}
TOKENIZER=${TOKENIZER:-data/tokenizer-$VOCAB_SIZE}
OUT=${OUT:-data/$DATASET-$VOCAB_SIZE}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

case "$DATASET" in
  tinystories) HUB=(--hf-dataset roneneldan/TinyStories) ;;
  fineweb-edu) HUB=(--hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-10BT) ;;
  openwebtext) HUB=(--hf-dataset Skylion007/openwebtext) ;;
  *) HUB=() ;;
esac
LIMITS=()
[ -n "${MAX_TOKENS:-}" ] && LIMITS+=(--max-tokens "$MAX_TOKENS")
[ -n "${MAX_DOCS:-}" ] && LIMITS+=(--max-docs "$MAX_DOCS")

SOURCE=()
if [ -n "${DATA:-}" ]; then
  mapfile -t FILES < <($PY -m src.data locate --data "$DATA")
  SOURCE=(--input "${FILES[@]}")
elif [ "$DATASET" = tinystories ] && FOUND=$($PY -m src.data locate 2>/dev/null); then
  mapfile -t FILES <<< "$FOUND"
  SOURCE=(--input "${FILES[@]}")
elif [ ${#HUB[@]} -gt 0 ]; then
  SOURCE=("${HUB[@]}")  # streamed from the Hugging Face hub (needs network)
else
  echo "prepare_data: DATASET=$DATASET is not a known hub dataset; set DATA=PATH" >&2
  exit 2
fi

echo "== tokenizer (vocab $VOCAB_SIZE) -> $TOKENIZER"
$PY -m src.tokenizer train "${SOURCE[@]}" ${MAX_DOCS:+--max-docs "$MAX_DOCS"} \
  --output "$TOKENIZER" --vocab-size "$VOCAB_SIZE"
echo "== token files -> $OUT"
$PY -m src.data prepare "${SOURCE[@]}" "${LIMITS[@]}" --tokenizer "$TOKENIZER" --output "$OUT"
$PY -m src.data stats "$OUT"
