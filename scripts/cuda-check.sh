#!/usr/bin/env bash
# Type-checks the CUDA build (`--features cuda`: align's CUDA-only code, candle's and cudarc's CUDA
# paths, every test target) on a machine with no CUDA toolkit and no GPU, in a few minutes.
#
#   bash scripts/cuda-check.sh            # cargo check --release --features cuda --workspace --all-targets
#
# candle-kernels' build script compiles its .cu files with nvcc, which this machine does not have
# and which takes over an hour on 2 cores for the GGUF/MoE kernels. `cargo check` never links and
# never runs a kernel, so a stand-in `nvcc` on PATH answers the build scripts instead: it reports a
# CUDA version (cudarc picks its bindings by it), writes empty PTX files and empty objects, and
# archives them. What this proves: every line of Rust behind `--features cuda` type-checks against
# candle 0.11's and cudarc's CUDA APIs. What it does not: that the kernels build or run — for that
# use scripts/cuda-toolchain.sh (the real nvcc) and scripts/gpu-check.sh on a GPU.
#
# Environment: CUDA_CHECK_VERSION (default 13.2, the version cuda-toolchain.sh pins),
# CARGO_TARGET_DIR (default target/cuda-check, apart from the CPU build's artifacts).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

version=${CUDA_CHECK_VERSION:-13.2}
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT
mkdir -p "$fake/bin"
cat >"$fake/bin/nvcc" <<EOF
#!/usr/bin/env bash
# Stand-in nvcc written by scripts/cuda-check.sh: for cargo check only, builds nothing real.
set -euo pipefail
mode=none out= outdir= srcs=()
while [ \$# -gt 0 ]; do
    case "\$1" in
        --version)
            printf 'nvcc: NVIDIA (R) Cuda compiler driver (stand-in of scripts/cuda-check.sh)\n'
            printf 'Copyright (c) NVIDIA Corporation\nBuilt on a machine without CUDA\n'
            printf 'Cuda compilation tools, release ${version}, V${version}.0\n'
            exit 0 ;;
        --list-gpu-code) printf 'sm_80\nsm_86\nsm_89\nsm_90\nsm_100\n'; exit 0 ;;
        --ptx) mode=ptx ;;
        -c) mode=obj ;;
        --lib) mode=lib ;;
        -o) out=\$2; shift ;;
        --output-directory) outdir=\$2; shift ;;
        -ccbin|--default-stream|-Xcompiler|-I|-D|-arch|-gencode) shift ;;
        -*) ;;
        *) srcs+=("\$1") ;;
    esac
    shift
done
case "\$mode" in
    ptx) for s in "\${srcs[@]}"; do
             b=\$(basename "\$s"); : >"\${outdir:-.}/\${b%.cu}.ptx"
         done ;;
    obj) cc -x c -c /dev/null -o "\$out" ;;
    lib) rm -f "\$out"; ar rcs "\$out" "\${srcs[@]}" ;;
    *) echo "stand-in nvcc: unsupported call: \$*" >&2; exit 1 ;;
esac
EOF
chmod +x "$fake/bin/nvcc"

export PATH="$fake/bin:$PATH"
export NVCC="$fake/bin/nvcc" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target/cuda-check}
# Its own target folder: artifacts built against the stand-in's empty kernels never mix with a real build.
cargo check --release --features cuda --workspace --all-targets "$@"
echo "cuda-check: the CUDA build type-checks (stand-in nvcc, CUDA $version; kernels not built)"
