#!/usr/bin/env bash
# Claim 1 of the LoRA-vs-full study: DPO on HH-RLHF harmless, LoRA r=4 on every layer (alpha
# 32, 10x the full-FT learning rate) reaches the held-out accuracy of full fine-tuning.
# SmolLM2-135M-Instruct, CPU. Resumable: rerun after a kill and each run continues from its
# last checkpoint; finished runs are kept.
#
#   recipes/01-dpo-hh/run.sh            # from the repository root or anywhere
#
# Environment: ALIGN (default target/release/align), PYTHON (with pyarrow, for the data split;
# default python3), MODEL (a SmolLM2 HF folder; default target/smollm2/model, fetched with
# scripts/fetch-smollm2.sh), OUT (default runs/recipes/01-dpo-hh), HH (the HH parquet).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
recipe_setup 01-dpo-hh
hh_split

train() { # NAME CONFIG
    run_once dpo "$1" --config "$here/$2" --model "$model" --data "$out/data/prefs-train.parquet" \
        --eval-data "$out/data/prefs-eval.parquet"
}
train full full.toml
train lora-r4 lora.toml
"$align" compare "$out/full" "$out/lora-r4" --eval-data "$out/data/prefs-eval.parquet" \
    --max-items 600 --out "$out/compare"
