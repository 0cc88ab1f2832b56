#!/usr/bin/env bash
# Rebuilds the embedded default (assets/default) with the project's own commands:
#   data split (python + pyarrow) -> align tokenizer train -> align init -> align sft --full.
# Deterministic seeds throughout; see docs/default-model.md. About 6-10 minutes on 2 CPU cores.
#
# Usage: scripts/make-default.sh [HH.parquet] [OUT]
#   HH.parquet  Anthropic HH-RLHF harmless (default ../shared/data/hh-rlhf-harmless.parquet)
#   OUT         output folder (default assets/default)
# Environment: PYTHON (default: /work/pyref/bin/python if present, else python3; needs pyarrow),
#              ALIGN (default: target/release/align, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
HH=${1:-../shared/data/hh-rlhf-harmless.parquet}
OUT=${2:-assets/default}
PY=${PYTHON:-$( [ -x /work/pyref/bin/python ] && echo /work/pyref/bin/python || echo python3 )}
ALIGN=${ALIGN:-target/release/align}
[ -x "$ALIGN" ] || cargo build --release
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Settings (documented in docs/default-model.md).
# Each can be overridden from the environment (scripts/make-hh-start.sh does).
PREFS_MODE=${PREFS_MODE:-shuffled}   # shuffled (synthetic, default) or hh (real HH pairs)
SFT_TEXT=${SFT_TEXT:-chosen}         # chosen transcripts, or both-tails (make_default_data.py)
N_TRAIN=${N_TRAIN:-400} N_EVAL=${N_EVAL:-200}
VOCAB=2048
SFT_STEPS=${SFT_STEPS:-150} SFT_LR=3e-3 SFT_BS=16 SFT_LEN=${SFT_LEN:-128}

mkdir -p "$OUT"
# 1. Split: the N_EVAL eval rows are held out of the tokenizer, SFT and DPO training.
"$PY" scripts/make_default_data.py "$HH" "$WORK" "$PREFS_MODE" "$N_TRAIN" "$N_EVAL" "$SFT_TEXT"
cp "$WORK/prefs-train.parquet" "$WORK/prefs-eval.parquet" "$OUT/"
# 2. Tokenizer on the SFT conversations.
"$ALIGN" tokenizer train --data "$WORK/sft.parquet" --vocab-size "$VOCAB" --out "$WORK/tok"
# 3. A small llama: hidden 128, 4 layers, 4 heads / 2 kv heads, MLP 384, tied embeddings.
"$ALIGN" init --family llama --size mini --hidden 128 --intermediate 384 --layers 4 \
  --heads 4 --kv-heads 2 --tie-embeddings --max-positions 512 --seed 0 \
  --tokenizer "$WORK/tok" --out "$WORK/init"
# 4. Full SFT from scratch on the chosen transcripts (every token a target).
"$ALIGN" sft --model "$WORK/init" --data "$WORK/sft.parquet" --text-column text --full \
  --lr "$SFT_LR" --warmup-steps 10 --batch-size "$SFT_BS" --max-length "$SFT_LEN" \
  --steps "$SFT_STEPS" --seed 0 --out "$WORK/sft"
rm -rf "$OUT/model"
cp -r "$WORK/sft/model" "$OUT/model"
cp "$WORK/sft/metrics.jsonl" "$OUT/sft-metrics.jsonl"
[ -f "$WORK/sft/metrics.png" ] && cp "$WORK/sft/metrics.png" "$OUT/sft-metrics.png"
du -sh "$OUT"
echo "model and preference pairs written to $OUT"
