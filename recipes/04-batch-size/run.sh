#!/usr/bin/env bash
# Claim 4 of the LoRA-vs-full study: LoRA falls behind full fine-tuning at large batch sizes
# (at small ones it keeps up). SFT of SmolLM2-135M-Instruct on 640 GSM8K chats, one epoch, at a
# global batch of 4 (160 steps) and of 32 (20 steps, micro-batches of 8), LoRA r=4 on every
# layer (lr 2e-4) and full FT (lr 2e-5); then `align compare` of LoRA against full FT at each
# batch size on the held-out NLL of 200 gsm8k-test chats (recipe 05's data/sft-eval.parquet).
# The claim predicts a gap (full − LoRA NLL, negative = LoRA behind) larger at 32 than at 4.
# Resumable: rerun after a kill; finished runs are kept.
#
#   recipes/04-batch-size/run.sh
#
# Environment: ALIGN (default target/release/align), MODEL (a SmolLM2 HF folder; default
# target/smollm2/model, fetched with scripts/fetch-smollm2.sh), OUT (default
# runs/recipes/04-batch-size).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
recipe_setup 04-batch-size
eval=$here/../05-attn-only/data/sft-eval.parquet

sft() { # NAME
    run_once sft "$1" --config "$here/$1.toml" --model "$model" \
        --data "$here/data/sft-train.parquet" --eval-data "$eval"
}
compare() { # OUT RUN...  (skipped when OUT/report.json exists: delete OUT to redo it)
    compare_once "$@" --eval-data "$eval" --margin 0.02
}
for run in lora-b4 lora-b32 full-b32 full-b4; do sft "$run"; done
compare "$out/compare-b4" "$out/full-b4" "$out/lora-b4"
compare "$out/compare-b32" "$out/full-b32" "$out/lora-b32"
