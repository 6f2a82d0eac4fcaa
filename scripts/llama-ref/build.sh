#!/usr/bin/env bash
# Compiles greedy.cpp against the llama.cpp built by scripts/build-llama-cpp.sh.
set -euo pipefail
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
L="$CACHE/llama.cpp"
here="$(cd "$(dirname "$0")" && pwd)"
g++ -O2 -std=c++17 "$here/greedy.cpp" -I"$L/include" -I"$L/ggml/include" -L"$L/build/bin" \
  -Wl,-rpath,"$L/build/bin" -lllama -lggml -lggml-base -o "$L/build/bin/llama-ref-greedy"
echo "$L/build/bin/llama-ref-greedy"
g++ -O2 -std=c++17 "$here/quantize.cpp" -I"$L/include" -I"$L/ggml/include" -L"$L/build/bin" \
  -Wl,-rpath,"$L/build/bin" -lggml -lggml-base -lggml-cpu -o "$L/build/bin/llama-ref-quantize"
echo "$L/build/bin/llama-ref-quantize"
