#!/usr/bin/env bash
# PPO from a reward model on HH-RLHF harmless, LoRA r=4 beside full fine-tuning, on
# SmolLM2-135M-Instruct (CPU). Steps: recipe 01's split (1,358 training / 575 held-out pairs
# after parsing), a reward model trained with `align rm` on the training pairs (its held-out
# accuracy sits beside DPO's implicit-reward accuracy of recipe 01 on the same pairs), then
# `align ppo` from that rm/ on the training transcripts' prompts, in both modes, and
# `align compare --against-start` on held-out prompts: each final policy's mean reward-model
# score against the start model's and against full fine-tuning's. Resumable: rerun after a kill.
#
#   recipes/06-ppo-hh/run.sh
#
# Environment: ALIGN, PYTHON (with pyarrow), MODEL, OUT (default runs/recipes/06-ppo-hh), HH,
# as recipes/01-dpo-hh/run.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
recipe_setup 06-ppo-hh
hh_split
[ -f "$out/data/prompts-eval.parquet" ] || "$py" "$here/make_prompts.py" "$out/data"

# The reward model (run_once knows adapter/ and model/; an rm run ends in rm/).
if [ -f "$out/rm/rm/config.json" ]; then
    echo "rm: done already"
elif ls -d "$out/rm"/checkpoint-* >/dev/null 2>&1; then
    "$align" rm --resume "$out/rm"
else
    "$align" rm --config "$here/rm.toml" --model "$model" --data "$out/data/prefs-train.parquet" \
        --eval-data "$out/data/prefs-eval.parquet" --out "$out/rm" --overwrite
fi
ppo() { # NAME CONFIG
    run_once ppo "$1" --config "$here/$2" --model "$model" --reward-model "$out/rm/rm" \
        --prompts "$out/data/prompts-train.parquet" --eval-data "$out/data/prompts-eval.parquet"
}
ppo ppo-lora-r4 ppo-lora-r4.toml
ppo ppo-full ppo-full.toml
ppo ppo-lora-r4-lr4e-4 ppo-lora-r4-lr4e-4.toml
compare_once "$out/compare" "$out/ppo-full" "$out/ppo-lora-r4" "$out/ppo-lora-r4-lr4e-4" --against-start \
    --eval-data "$out/data/prompts-eval.parquet" --max-items 128 --samples 2 --margin "${MARGIN:-0.1}"
