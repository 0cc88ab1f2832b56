#!/usr/bin/env bash
# Claim 5 of the LoRA-vs-full study: LoRA on every layer (MLP included) beats attention-only
# LoRA at the same number of trainable parameters. GRPO on recipe 02's task (small additions,
# SmolLM2-135M-Instruct): full FT, LoRA r=4 on all layers and LoRA r=11 on q,k,v,o only
# (1.04x the parameters of the former), then `align compare` of the three on the 80 held-out
# prompts. Then the same two adapters on SFT, where capacity matters more than in RL: GSM8K
# solutions (320 training chats, one epoch; `data/sft-*.parquet`, written by make_sft_data.py)
# with `align compare` of the held-out NLL on 200 test chats. `SFT=0` skips that part, `RL=0`
# the GRPO part. Resumable: rerun after a kill; finished runs are kept.
#
#   recipes/05-attn-only/run.sh
#
# Environment: ALIGN (default target/release/align), MODEL (a SmolLM2 HF folder; default
# target/smollm2/model, fetched with scripts/fetch-smollm2.sh), OUT (default
# runs/recipes/05-attn-only). Recipe 02's full and lora-r4 runs can be copied into OUT first
# (cp -r) to skip them: this recipe trains them with the same configs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
recipe_setup 05-attn-only
task=$here/../02-grpo-arith

train() { # NAME CONFIG
    run_once grpo "$1" --config "$2" --model "$model" --prompts "$task/data/train.parquet" \
        --eval-data "$task/data/eval.parquet"
}
if [ "${RL:-1}" != 0 ]; then
train full "$task/full.toml"
train lora-r4 "$task/lora-r4.toml"
train attn-r11 "$here/attn-r11.toml"
# all layers first: the baseline each other run is judged against
compare_once "$out/compare" "$out/lora-r4" "$out/attn-r11" "$out/full" \
    --eval-data "$task/data/eval.parquet" --samples 8 --margin 0.05 --batch-size 64
fi
[ "${SFT:-1}" = 0 ] && exit 0

sft() { # NAME CONFIG
    run_once sft "$1" --config "$2" --model "$model" --data "$here/data/sft-train.parquet" \
        --eval-data "$here/data/sft-eval.parquet"
}
sft sft-all-r4 "$here/sft-all-r4.toml"
sft sft-attn-r11 "$here/sft-attn-r11.toml"
# held-out NLL per chat, the all-layers run the baseline; margin 0.02 nats per token
compare_once "$out/compare-sft" "$out/sft-all-r4" "$out/sft-attn-r11" \
    --eval-data "$here/data/sft-eval.parquet" --margin 0.02
