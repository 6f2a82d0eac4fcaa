#!/usr/bin/env bash
# Builds llama.cpp (the reference runtime and the benchmark peer) from the source that
# the PyPI sdist of llama-cpp-python vendors. Output: $SO8T_CACHE/llama.cpp/build/bin.
# Takes ~7 minutes on 2 cores. Needs cmake and a C++ compiler (apt-get install cmake).
set -euo pipefail
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="$CACHE/llama.cpp"
targets=(llama-cli llama-bench llama-quantize llama-server llama-simple llama-tokenize llama-perplexity llama-mtmd-cli)
missing=()
for t in "${targets[@]}" llama-ref-greedy; do [ -x "$DEST/build/bin/$t" ] || missing+=("$t"); done
if [ ${#missing[@]} = 0 ]; then
  echo "llama.cpp: built at $DEST/build/bin"; exit 0
fi
# A tool added to the list since the cache was built: build just that, not all again.
if [ -f "$DEST/build/CMakeCache.txt" ] && [ -x "$DEST/build/bin/llama-ref-greedy" ]; then
  cmake --build "$DEST/build" -j"$(nproc)" --target "${missing[@]}"
  echo "llama.cpp: built at $DEST/build/bin"; exit 0
fi
command -v cmake >/dev/null || { echo "cmake not found: apt-get install -y cmake" >&2; exit 1; }
tmp="$(mktemp -d)"
# Only the package itself from source: its build dependencies (cmake, ninja) as wheels,
# or pip builds them from source first just to read the sdist's metadata (tens of minutes).
python3 -m pip download --quiet --no-deps --no-binary=llama-cpp-python -d "$tmp" "llama-cpp-python==$VERSION"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
rm -rf "$DEST"; mkdir -p "$CACHE"
mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST"
rm -rf "$tmp"
# Not GGML_NATIVE: these VMs list AMX in /proc/cpuinfo, -march=native then enables
# ggml's AMX kernels, and batched matmuls die with SIGILL/SIGSEGV (seen here with
# llama-bench). The flags below are everything else the CPU has (AVX-512 + VNNI + BF16).
# LLAMA_CPP_NATIVE=1 restores the native build on machines where AMX works.
# Without AVX-512 (e.g. AMD EPYC before Zen 4) those flags would build code that dies with
# SIGILL: such machines get the native build (they have no AMX either).
if [ "${LLAMA_CPP_NATIVE:-0}" = 1 ] || ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  cpu_flags=(-DGGML_NATIVE=ON)
else
  cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
             -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  # Each extension only where the CPU lists it: AMD Zen 4 has AVX512-VNNI but not the
  # VEX-encoded AVX-VNNI, and code built for an extension the CPU lacks dies with SIGILL.
  flags="$(grep -m1 '^flags' /proc/cpuinfo)"
  for f in avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    if grep -qw "${f%%:*}" <<<"$flags"; then cpu_flags+=("-DGGML_${f#*:}=ON"); else cpu_flags+=("-DGGML_${f#*:}=OFF"); fi
  done
fi
cmake -S "$DEST" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${cpu_flags[@]}" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON
cmake --build "$DEST/build" -j"$(nproc)" --target "${targets[@]}"
"$(dirname "$0")/llama-ref/build.sh" >/dev/null
echo "llama.cpp: built at $DEST/build/bin"
