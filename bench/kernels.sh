#!/usr/bin/env bash
# What the hand-written kernels gain: so8t bench with each kernel this CPU has
# (SO8T_KERNEL forces one), same files and threads as bench/compare.sh.
#
#   bench/kernels.sh [THREADS] [REPETITIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
T="${1:-2}"
R="${2:-3}"
cargo build --release -q -p so8t-cli
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); so8t $(git rev-parse --short HEAD)"
for m in SmolLM2-135M-Instruct.Q8_0.gguf SmolLM2-135M-Instruct.Q4_0.gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
  echo
  echo "## $m, $T threads, pp64 and tg32, $R repetitions"
  echo
  for k in portable avx2 avx512vnni; do
    SO8T_KERNEL=$k ./target/release/so8t bench -m "$CACHE/$m" -p 64 -n 32 -r "$R" -t "$T" --no-probe | grep -E '^\| [a-z]' | grep -v '^| model' | head -2
  done
done
