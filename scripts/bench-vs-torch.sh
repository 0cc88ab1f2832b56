#!/usr/bin/env bash
# Side-by-side DPO step benchmark: `align bench dpo` and benches/torch_dpo_step.py (PyTorch +
# PEFT) on the identical token ids, back to back, one process each (peak RSS is its own).
#
#   scripts/bench-vs-torch.sh MODEL DATA [extra `align bench dpo` flags]
#
# Environment: ALIGN (binary, default target/release/align), PYTHON (with torch, transformers,
# peft; default python3), MODES ("lora full" by default; "lora" alone for large models),
# WARMUP (untimed steps, default 2). Set ALIGN_NO_FUSED=1 to time align without its fused
# kernels (every position making logits, composite ops), i.e. the engine before they existed.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 MODEL DATA [align bench dpo flags]" >&2
    exit 2
fi
model=$1
data=$2
shift 2
align=${ALIGN:-target/release/align}
python=${PYTHON:-python3}
modes=${MODES:-lora full}
warmup=${WARMUP:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for mode in $modes; do
    flag=""
    [ "$mode" = full ] && flag=--full
    "$align" bench dpo --model "$model" --data "$data" $flag --warmup "$warmup" --json \
        --pairs-out "$tmp/pairs.json" "$@" >"$tmp/align-$mode.json"
    "$python" "$here/benches/torch_dpo_step.py" "$model" "$tmp/pairs.json" $flag \
        --warmup "$warmup" >"$tmp/torch-$mode.json"
done
"$python" - "$tmp" $modes <<'PY'
import json, sys
tmp, modes = sys.argv[1], sys.argv[2:]
rows = {}
print("| mode | run | s/step | tokens/s | peak RSS (MB) | slowest/median | (per token) |")
print("|---|---|---:|---:|---:|---:|---:|")
for m in modes:
    for impl in ["torch", "align"]:
        r = json.loads(open(f"{tmp}/{impl}-{m}.json").read().strip().splitlines()[-1])
        rows[(impl, m)] = r
        name = f"PyTorch {r.get('torch', '')} + PEFT" if impl == "torch" else "align"
        print(f"| {m} | {name} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} "
              f"| {r['slowest_over_median']:.2f} | {r['slowest_per_token_over_median']:.2f} |")
print()
for m in modes:
    a, t = rows[("align", m)], rows[("torch", m)]
    print(f"{m}: align/PyTorch tokens/s {a['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
          f"peak RSS {a['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
if ("align", "lora") in rows and ("align", "full") in rows:
    print(f"align LoRA step / full-FT step: "
          f"{rows[('align', 'lora')]['s_per_step'] / rows[('align', 'full')]['s_per_step']:.2f}")
PY
