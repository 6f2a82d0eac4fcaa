#!/usr/bin/env bash
# Builds llama.cpp (the reference runtime and the benchmark peer) from the source that
# the PyPI sdist of llama-cpp-python vendors. Output: $SO8T_CACHE/llama.cpp/build/bin.
# Takes ~7 minutes on 2 cores. Needs cmake and a C++ compiler (apt-get install cmake).
set -euo pipefail
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="$CACHE/llama.cpp"
if [ -x "$DEST/build/bin/llama-cli" ] && [ -x "$DEST/build/bin/llama-bench" ]; then
  echo "llama.cpp: built at $DEST/build/bin"; exit 0
fi
command -v cmake >/dev/null || { echo "cmake not found: apt-get install -y cmake" >&2; exit 1; }
tmp="$(mktemp -d)"
python3 -m pip download --quiet --no-deps --no-binary=:all: -d "$tmp" "llama-cpp-python==$VERSION"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
rm -rf "$DEST"; mkdir -p "$CACHE"
mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST"
rm -rf "$tmp"
cmake -S "$DEST" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON
cmake --build "$DEST/build" -j"$(nproc)" --target llama-cli llama-bench llama-quantize llama-server llama-simple llama-tokenize llama-gguf-split
echo "llama.cpp: built at $DEST/build/bin"
