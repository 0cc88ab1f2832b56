#!/usr/bin/env bash
# Builds the starting point for DPO on real HH-RLHF harmless pairs (docs/dpo.md): the embedded
# default's recipe (scripts/make-default.sh: split -> align tokenizer train -> align init ->
# align sft --full) with the real pairs, a 1,400/600 split and a neutral SFT text.
# Deterministic seeds; about 8 minutes on 2 CPU cores.
#
# Usage: scripts/make-hh-start.sh [HH.parquet] [OUT]
#   HH.parquet  Anthropic HH-RLHF harmless (default ../shared/data/hh-rlhf-harmless.parquet)
#   OUT         output folder (default runs/hh-start)
# Writes OUT/model (HF llama folder, 1.05M parameters, SFT-trained), OUT/prefs-train.parquet
# (the 1,400 train rows: 1,358 usable pairs), OUT/prefs-eval.parquet (600 held-out rows: 575
# usable pairs, never seen by the tokenizer, SFT or DPO) and OUT/sft-metrics.jsonl.
# SFT text: the chosen AND rejected transcripts of the train rows, each cut to its last turns,
# so the start model favours neither side (see make_default_data.py, `both-tails`).
# Environment: as scripts/make-default.sh (PYTHON, ALIGN), plus SFT_STEPS (default 800).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFS_MODE=hh SFT_TEXT=both-tails N_TRAIN=1400 N_EVAL=600 SFT_STEPS=${SFT_STEPS:-800} SFT_LEN=160 \
  exec scripts/make-default.sh "${1:-../shared/data/hh-rlhf-harmless.parquet}" "${2:-runs/hh-start}"
