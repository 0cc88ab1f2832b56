#!/usr/bin/env bash
# The one GPU check: build with CUDA, then on the GPU
#   (a) parity: tests/parity.rs (log-probs against transformers within 1e-3 in f32 and 1% in
#       bf16/f16, LoRA gradients) and tests/device.rs (fused LoRA op, AdamW, a DPO step's host
#       reads, three DPO steps against the same steps on the CPU), with ALIGN_TEST_DEVICE=cuda;
#   (b) a DPO run and a GRPO run of a few steps with --device cuda;
#   (c) benchmarks in bf16: training tokens/s and model-FLOPs utilisation of a LoRA step for
#       SmolLM2-135M (when it is at $ALIGN_SMOLLM2 or scripts/fetch-smollm2.sh fetches it) and a
#       ~0.5B random model (align init, Qwen2.5-0.5B's shape), generation tokens/s at batch 1 and
#       64, peak GPU memory of each;
# and write everything to $RESULTS/gpu-check.md (default gpu-check-results/), with the full
# log beside it. Meant to finish in under 8 minutes on one H100/H200 (each phase has a time
# limit; a phase that fails is recorded and the script goes on; the exit status is non-zero
# if any failed).
#
#   bash scripts/gpu-check.sh              # everything
#   ALIGN_GPU_CHECK_DEVICE=cpu bash scripts/gpu-check.sh --dry-run
#                                          # the phases' commands on the CPU, tiny sizes (no GPU)
#
# Toolchain: an nvcc on PATH or in $CUDA_HOME is used as is; otherwise
# scripts/cuda-toolchain.sh makes one from NVIDIA's PyPI wheels (needs network once).
# The wheels are CUDA 13.2: the driver must support CUDA >= 13.2 (checked below).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD
dry=0
[[ ${1:-} == --dry-run ]] && dry=1
device=${ALIGN_GPU_CHECK_DEVICE:-cuda}
results=${RESULTS:-$root/gpu-check-results}
mkdir -p "$results"
md=$results/gpu-check.md
log=$results/gpu-check.log
: >"$log"
failures=0
start=$SECONDS

note() { echo "$*" | tee -a "$md"; }
say() { echo "gpu-check [$((SECONDS - start))s]: $*" | tee -a "$log" >&2; }

# run NAME LIMIT_S CMD...: runs CMD with a time limit, output to the log; records pass/fail.
run() {
  local name=$1 limit=$2
  shift 2
  say "$name: $*"
  local t0=$SECONDS
  if timeout "$limit" "$@" >>"$log" 2>&1; then
    note "- $name: ok ($((SECONDS - t0)) s)"
    return 0
  fi
  local rc=$?
  failures=$((failures + 1))
  note "- $name: FAILED (exit $rc after $((SECONDS - t0)) s; see gpu-check.log)"
  return 1
}

# Peak GPU memory while a command runs: nvidia-smi samples every 100 ms in the background.
mem_sampler=
mem_file=$results/.mem
mem_start() {
  : >"$mem_file"
  if [[ $device == cuda* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$mem_file" 2>/dev/null &
    mem_sampler=$!
  fi
}
mem_peak() {
  if [[ -n $mem_sampler ]]; then
    kill "$mem_sampler" 2>/dev/null
    wait "$mem_sampler" 2>/dev/null
    mem_sampler=
  fi
  sort -n "$mem_file" | tail -1 | tr -d ' '
}
trap '[[ -n $mem_sampler ]] && kill "$mem_sampler" 2>/dev/null' EXIT

{
  echo "# align GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with local changes)'), device $device"
  echo
} >"$md"

# ---- 0. the GPU and the toolchain --------------------------------------------------------
if [[ $device == cuda* ]]; then
  if ! command -v nvidia-smi >/dev/null; then
    say "no nvidia-smi: is this a GPU machine? (ALIGN_GPU_CHECK_DEVICE=cpu runs the CPU dry run)"
    exit 2
  fi
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | head -1)
  cuda_drv=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
  note "GPU: $gpu; driver supports CUDA ${cuda_drv:-?}"
  if [[ -n $cuda_drv ]] && [[ $(printf '%s\n13.2\n' "$cuda_drv" | sort -V | head -1) != 13.2 ]]; then
    note "warning: the driver supports CUDA $cuda_drv < 13.2; kernels built with CUDA 13.2 will not load unless a CUDA <= $cuda_drv toolkit is on PATH"
  fi
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$cap}
fi
if ! command -v nvcc >/dev/null; then
  if [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; then
    export PATH=$CUDA_HOME/bin:$PATH
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
  else
    say "no nvcc: making the toolchain from PyPI wheels (scripts/cuda-toolchain.sh)"
    if ! toolchain=$(bash scripts/cuda-toolchain.sh 2>>"$log"); then
      note "- toolchain: FAILED (scripts/cuda-toolchain.sh; see gpu-check.log)"
      exit 1
    fi
    eval "$toolchain"
  fi
fi
# The wheel toolchain's LD_LIBRARY_PATH has no libcuda (its stub is link-time only): the
# driver's libcuda.so.1 is found by the loader as usual.
note "nvcc: $(nvcc --version | tail -2 | head -1)"
echo >>"$md"

# ---- build ------------------------------------------------------------------------------
features=(--features cuda)
[[ $device == cpu ]] && features=()
echo "## build" >>"$md"
if [[ -f target/.cuda-kernels-unoptimised && $device == cuda* ]]; then
  # .ci/run compiled candle-kernels without device-code optimisation (it never runs them).
  run "cargo clean -p candle-kernels (CI-built kernels are unoptimised)" 60 \
    cargo clean --release -p candle-kernels && rm -f target/.cuda-kernels-unoptimised
fi
run "cargo build --release ${features[*]}" 420 cargo build --release "${features[@]}" || {
  say "the build failed; nothing else can run"
  exit 1
}
run "compile tests" 300 cargo test --release "${features[@]}" --no-run --test parity --test device
align=$root/target/release/align
echo >>"$md"

# ---- (a) parity ---------------------------------------------------------------------------
echo "## (a) parity on $device" >>"$md"
run "tests/parity.rs (transformers/PEFT fixtures)" 240 env ALIGN_TEST_DEVICE="$device" \
  cargo test --release "${features[@]}" --test parity
run "tests/device.rs (vs the CPU)" 240 env ALIGN_TEST_DEVICE="$device" \
  cargo test --release "${features[@]}" --test device
echo >>"$md"

# ---- (b) DPO and GRPO runs ------------------------------------------------------------------
echo "## (b) training runs on $device" >>"$md"
work=$results/runs
rm -rf "$work"
mkdir -p "$work"
last_metric() { # FILE KEY
  tail -1 "$1" 2>/dev/null | grep -o "\"$2\":[-0-9.e+]*" | head -1 | cut -d: -f2
}
for dt in f32 bf16; do
  out=$work/dpo-$dt
  if run "dpo, embedded default, 20 steps, $dt" 150 "$align" dpo --device "$device" --dtype "$dt" \
    --steps 20 --out "$out"; then
    note "  loss $(last_metric "$out/metrics.jsonl" loss), rewards/accuracies $(last_metric "$out/metrics.jsonl" 'rewards\/accuracies'), tokens/s $(last_metric "$out/metrics.jsonl" tokens_per_s), host reads/step $(last_metric "$out/metrics.jsonl" host_reads)"
  fi
done
out=$work/grpo
if run "grpo, tests/fixtures llama, char_fraction reward, 8 steps" 150 "$align" grpo --device "$device" \
  --model tests/fixtures/models/llama --prompts tests/fixtures/generation/demo_prompts.parquet \
  --reward char_fraction --chars 0123456789 --rank 4 --steps 8 --max-new-tokens 8 --lr 1e-2 \
  --schedule constant --out "$out"; then
  note "  reward $(grep -o '"reward":[-0-9.e+]*' "$out/metrics.jsonl" | head -1 | cut -d: -f2) -> $(last_metric "$out/metrics.jsonl" reward), host reads/step $(last_metric "$out/metrics.jsonl" host_reads)"
fi
echo >>"$md"

# ---- (c) benchmarks -------------------------------------------------------------------------
echo "## (c) benchmarks, bf16" >>"$md"
models=$results/models
mkdir -p "$models"
bench_dtype=bf16
if ((dry)); then
  bench_dtype=f32
  q=(--size tiny --vocab-size 512)
else
  # Qwen2.5-0.5B's shape: 494M parameters with tied embeddings.
  q=(--size base --hidden 896 --intermediate 4864 --layers 24 --heads 14 --kv-heads 2
    --vocab-size 151936 --tie-embeddings)
fi
run "align init (random ~0.5B qwen2)" 120 "$align" init --family qwen2 "${q[@]}" \
  --tokenizer tests/fixtures/tokenizer --max-positions 4096 --dtype "$bench_dtype" --out "$models/qwen2-0.5b"
bench_models=("$models/qwen2-0.5b")
smol=${ALIGN_SMOLLM2:-/work/models/smollm2}
if [[ ! -f $smol/config.json && -f scripts/fetch-smollm2.sh ]]; then
  run "scripts/fetch-smollm2.sh" 180 bash scripts/fetch-smollm2.sh "$smol" || true
fi
if [[ -f $smol/config.json ]]; then
  bench_models=("$smol" "${bench_models[@]}")
else
  note "- SmolLM2-135M: skipped (no $smol/config.json and no scripts/fetch-smollm2.sh that made it)"
fi

# H100/H200 SXM dense bf16 peak: 989 TFLOP/s (override with ALIGN_PEAK_TFLOPS).
peak_tflops=${ALIGN_PEAK_TFLOPS:-989}
if ((dry)); then bs=2 seq=64 steps=1 gen_new=8; else bs=${ALIGN_BENCH_BATCH:-16} seq=${ALIGN_BENCH_SEQ:-1024} steps=5 gen_new=128; fi
{
  echo
  echo "MFU = FLOPs per token × tokens/s ÷ ${peak_tflops} TFLOP/s, FLOPs per token counted as 6·N for full"
  echo "fine-tuning and 4·N for LoRA (forward 2N + input gradients 2N; no weight gradients), N the"
  echo "parameters in matrix products (embeddings excluded when untied); attention scores not counted."
  echo
  echo "| model | mode | params (M) | batch × seq | step (s) | tokens/s | MFU | peak GPU MB |"
  echo "|---|---|---:|---|---:|---:|---:|---:|"
} >>"$md"
for m in "${bench_models[@]}"; do
  [[ -f $m/config.json ]] || continue
  name=$(basename "$m")
  for mode in lora full; do
    mem_start
    if out=$(timeout 240 "$align" bench train-one --mode "$mode" --model "$m" --device "$device" \
      --dtype "$bench_dtype" --batch-size "$bs" --seq-len "$seq" --steps "$steps" 2>>"$log"); then
      peak=$(mem_peak)
      echo "$out" >>"$log"
      params=$(grep -o '"params":[0-9]*' <<<"$out" | cut -d: -f2)
      step_s=$(grep -o '"step_s":[0-9.e+-]*' <<<"$out" | cut -d: -f2)
      # Matmul parameters: all but the input embedding (tied: the embedding is the lm_head).
      emb=$(awk -F'[:,]' '/"vocab_size"/ {v=$2} /"hidden_size"/ {h=$2} /"tie_word_embeddings"/ {t=$2}
        END { if (t ~ /true/) print 0; else print v*h }' "$m/config.json")
      awk -v p="$params" -v e="$emb" -v s="$step_s" -v b="$bs" -v l="$seq" -v mode="$mode" \
        -v pk="$peak_tflops" -v name="$name" -v mem="${peak:-?}" 'BEGIN {
          n = p - e; tok = b * l / s; f = (mode == "full" ? 6 : 4) * n
          printf "| %s | %s | %.1f | %d × %d | %.3f | %.0f | %.1f%% | %s |\n",
            name, mode, p / 1e6, b, l, s, tok, 100 * f * tok / (pk * 1e12), mem }' >>"$md"
    else
      mem_peak >/dev/null
      failures=$((failures + 1))
      echo "| $name | $mode | | $bs × $seq | FAILED | | | |" >>"$md"
    fi
  done
done
{
  echo
  echo "| model | batch | generated tokens/s | peak GPU MB |"
  echo "|---|---:|---:|---:|"
} >>"$md"
for m in "${bench_models[@]}"; do
  [[ -f $m/config.json ]] || continue
  for b in 1 64; do
    mem_start
    if out=$(timeout 180 "$align" bench generate --model "$m" --device "$device" --dtype "$bench_dtype" \
      --batch "$b" --prompt-len 128 --new-tokens "$gen_new" 2>>"$log"); then
      peak=$(mem_peak)
      echo "$out" >>"$log"
      tps=$(grep "^| $b |" <<<"$out" | awk -F'|' '{gsub(/ /, "", $4); print $4}')
      echo "| $(basename "$m") | $b | ${tps:-?} | ${peak:-?} |" >>"$md"
    else
      mem_peak >/dev/null
      failures=$((failures + 1))
      echo "| $(basename "$m") | $b | FAILED | |" >>"$md"
    fi
  done
done

note ""
note "total $((SECONDS - start)) s, $failures failure(s)"
say "results: $md"
exit $((failures > 0))
