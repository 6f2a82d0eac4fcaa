#!/usr/bin/env bash
# Builds what bench/cuda.sh runs on a GPU machine and packs it under .dev/ (git-ignored
# locally): the so8t binary and the CUDA test binary (built with --features cuda,
# stripped, xz) and SmolLM2-135M Q4_0 cut into parts, since a device call carries at most
# 64 MiB with the tree: .dev/1 holds the binaries and the first part, .dev/2 and .dev/3
# the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
touch .git/info/exclude
grep -qx '/.dev/' .git/info/exclude || echo '/.dev/' >>.git/info/exclude
eval "$(scripts/cuda-toolchain.sh)"
cargo build --release -p so8t-cli --features cuda --target-dir target/cuda
tests="$(cargo test --release -p so8t-cli --features cuda --test cuda --no-run --target-dir target/cuda --message-format json 2>/dev/null \
  | python3 -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable")][0])')"
rm -rf .dev; mkdir -p .dev/1 .dev/2 .dev/3
strip -o .dev/1/so8t target/cuda/release/so8t && xz -T2 .dev/1/so8t
strip -o .dev/1/cuda-tests "$tests" && xz -T2 .dev/1/cuda-tests
model="${SO8T_CACHE:-$HOME/.cache/so8t}/SmolLM2-135M-Instruct.Q4_0.gguf"
split -b 18M -d -a 1 "$model" .dev/part
mv .dev/part0 .dev/1/smollm2.q4_0.part0
cat .dev/part1 .dev/part2 >.dev/2/smollm2.q4_0.part1
cat .dev/part[3-9] >.dev/3/smollm2.q4_0.part2
rm .dev/part*
du -sh .dev/*
