#!/usr/bin/env bash
# Claim 3 of the LoRA-vs-full study: the best LoRA learning rate is about 10x the best full
# fine-tuning one. Measured, not assumed: an `align sweep` of GRPO on recipe 02's task
# (small additions, SmolLM2-135M-Instruct), LoRA r=4 on all layers at 5e-5, 2e-4, 8e-4 and
# full FT at 1.25e-6, 5e-6, 2e-5, 8e-5 (a 4x grid, so the measured ratio is 10x times a power of 4; the lowest full-FT point was added when 5e-6 came out best),
# then `align compare` of the sweep on the 80 held-out prompts: the best lr of each mode and
# their ratio. Resumable: rerun after a kill; finished points are skipped.
#
#   recipes/03-lr-sweep/run.sh
#
# Environment: ALIGN (default target/release/align), MODEL (a SmolLM2 HF folder; default
# target/smollm2/model, fetched with scripts/fetch-smollm2.sh), OUT (default
# runs/recipes/03-lr-sweep). Recipe 02's lora-r4 and full runs are the points lora-lr-2e-4 and
# full-lr-2e-5 (same configs, same seed): copy them into OUT/sweep/ under those names to skip
# them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
recipe_setup 03-lr-sweep
task=$here/../02-grpo-arith
# the config gives rank 4 / all-linear / alpha 32; --full ignores them for the full-FT points
"$align" sweep grpo --config "$task/lora-r4.toml" --lr 5e-5,2e-4,8e-4 --full-lr 1.25e-6,5e-6,2e-5,8e-5 \
    --out "$out/sweep" -- --model "$model" --prompts "$task/data/train.parquet" \
    --eval-data "$task/data/eval.parquet"
compare_once "$out/compare" "$out/sweep" --eval-data "$task/data/eval.parquet" --samples 8 \
    --margin 0.05 --batch-size 64
