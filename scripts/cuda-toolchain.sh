#!/usr/bin/env bash
# Sets up what `cargo build --features cuda` needs on a machine without CUDA: nvcc and
# the CUDA headers (with libcu++) from NVIDIA's PyPI wheels (CUDA 13.0, ~100 MB, cached),
# and link stubs for the libraries candle's CUDA backend links against (the driver,
# cuBLAS, cuBLASLt, cuRAND, NVRTC). A stub holds each function's name and nothing else,
# as the toolkit's own lib64/stubs do: the binary records the real library's soname and
# the dynamic loader finds the real one (driver and CUDA 13 libraries) on the GPU machine
# at run time. Each stub function returns 100, the driver's CUDA_ERROR_NO_DEVICE: with
# LD_LIBRARY_PATH at the stubs (as the tests run the CUDA build here), a binary sees a
# machine without a GPU.
#
# Usage: eval "$(scripts/cuda-toolchain.sh)"   # prints the exports for the build
# CUDA_COMPUTE_CAP (default 90, Hopper) is the GPU generation the kernels are built for.
set -euo pipefail
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
CUDA_VERSION=13.0
PREFIX="$CACHE/cuda-$CUDA_VERSION"
ROOT="$PREFIX/nvidia/cu13"
CUDARC_VERSION=0.19.10

WHEELS="nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-cccl"
if [ "$(cat "$PREFIX/.wheels" 2>/dev/null)" != "$WHEELS" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 \
    -d "$tmp" $(for w in $WHEELS; do echo "$w==$CUDA_VERSION.*"; done) >&2
  rm -rf "$PREFIX.partial"; mkdir -p "$PREFIX.partial"
  for w in "$tmp"/*.whl; do unzip -q -o "$w" 'nvidia/*' -d "$PREFIX.partial"; done
  rm -rf "$tmp" "$PREFIX"; mv "$PREFIX.partial" "$PREFIX"
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/*
  echo "$WHEELS" >"$PREFIX/.wheels"
fi
# The wheels ship only versioned runtime libraries; the linker looks for the bare name.
ln -sf libcudart.so.13 "$ROOT/lib/libcudart.so"

# Link stubs, from the names cudarc's bindings call (the crate candle builds with).
stubs="$ROOT/stubs"
if [ ! -e "$stubs/.cudarc-$CUDARC_VERSION" ]; then
  # `|| true`: under pipefail a missing directory (a fresh machine: cargo has not unpacked
  # cudarc yet) would end the script here, before the fetch below.
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-$CUDARC_VERSION 2>/dev/null | head -1 || true)"
  if [ -z "$src" ]; then
    (cd "$(dirname "$0")/.." && cargo fetch --quiet >&2)
    src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-$CUDARC_VERSION | head -1)"
  fi
  rm -rf "$stubs"; mkdir -p "$stubs"
  # library, its soname on CUDA 13, the bindings that name its functions
  while read -r lib soname dir; do
    grep -ohE 'pub unsafe fn [A-Za-z_0-9]+\(' "$src/src/$dir/sys/mod.rs" \
      | sed -E 's/pub unsafe fn ([A-Za-z_0-9]+)\(/int \1(void) { return 100; }/' | sort -u >"$stubs/$lib.c"
    cc -shared -fPIC -o "$stubs/lib$lib.so" -Wl,-soname,"$soname" "$stubs/$lib.c"
    ln -sf "lib$lib.so" "$stubs/$soname"
  done <<LIBS
cuda libcuda.so.1 driver
cublas libcublas.so.13 cublas
cublasLt libcublasLt.so.13 cublaslt
curand libcurand.so.10 curand
nvrtc libnvrtc.so.13 nvrtc
LIBS
  touch "$stubs/.cudarc-$CUDARC_VERSION"
fi

echo "export CUDA_ROOT='$ROOT' CUDA_HOME='$ROOT' PATH='$ROOT/bin':\"\$PATH\""
echo "export LIBRARY_PATH='$stubs:$ROOT/lib'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
