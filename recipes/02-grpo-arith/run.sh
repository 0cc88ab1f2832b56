#!/usr/bin/env bash
# Claim 2 of the LoRA-vs-full study: in RL, LoRA at very low rank (r=1, r=4, on every layer,
# alpha 32, 10x the full-FT learning rate) matches full fine-tuning. GRPO on a verifiable task
# where the start model's mean reward is between 0.1 and 0.6: small additions ("What is 7 + 15?")
# that SmolLM2-135M-Instruct answers right about one time in five at temperature 0.7. GRPO with
# full fine-tuning, LoRA r=1 and LoRA r=4; then PPO (value model, GAE) with full FT and r=4.
# CPU. Resumable: rerun after a kill and each run continues from its last checkpoint; finished
# runs are kept.
#
#   recipes/02-grpo-arith/run.sh            # from the repository root or anywhere
#
# Environment: ALIGN (default target/release/align), MODEL (a SmolLM2 HF folder; default
# target/smollm2/model, fetched with scripts/fetch-smollm2.sh), OUT (default
# runs/recipes/02-grpo-arith), PPO (0: GRPO only). The prompt sets are committed in data/ (make_prompts.py wrote
# them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
recipe_setup 02-grpo-arith

train() { # COMMAND NAME CONFIG
    run_once "$1" "$2" --config "$here/$3" --model "$model" --prompts "$here/data/train.parquet" \
        --eval-data "$here/data/eval.parquet"
}
# every final model on the same 80 held-out prompts, 8 completions each with the same seeds;
# a parity margin of 0.05 reward (the eval set is small: 80 prompts)
compare() { # OUT RUN...   (skipped when OUT/report.json exists: delete OUT to redo it)
    compare_once "$@" --eval-data "$here/data/eval.parquet" --samples 8 --margin 0.05 \
        --batch-size 64
}
train grpo full full.toml
train grpo lora-r1 lora-r1.toml
train grpo lora-r4 lora-r4.toml
compare "$out/compare" "$out/full" "$out/lora-r1" "$out/lora-r4"
[ "${PPO:-1}" = 0 ] && exit 0
train ppo ppo-lora-r4 ppo-lora-r4.toml
train ppo ppo-full ppo-full.toml
compare "$out/compare-ppo" "$out/ppo-full" "$out/ppo-lora-r4"
