#!/usr/bin/env bash
# Trains and evaluates the SO8T heads (and a short gates run) on the real small models,
# writing the committed reports under eval/ and the trained SmolLM2 adapter that
# crates/so8t/tests/real_train.rs checks. Work files go to target/train-eval/.
#
#   scripts/train-eval.sh [smollm2|qwen25coder|all]      (default: all)
#
# Times on the 2-core machine are in README ("Training results").
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
cargo build --release -p so8t-cli
so8t=target/release/so8t
cache="${SO8T_CACHE:-$HOME/.cache/so8t}"
work=target/train-eval
mkdir -p "$work"
data=data/safety

heads() { # name gguf
  local name=$1 gguf=$2
  bash scripts/fetch-models.sh "${3}"
  $so8t convert "$cache/$gguf" --out "$work/$name" --force
  $so8t train --model "$work/$name" --data $data/train.jsonl --val $data/val.jsonl --mode heads \
    --out "$work/$name-heads" | tee "$work/$name-heads.json"
  $so8t eval --model "$work/$name-heads" --data $data/test.jsonl --report "eval/$name-heads" \
    --notes "$name, zero gates; heads fitted by \`so8t train --mode heads\` on data/safety/train.jsonl; weight decay and thresholds (5% FPR) chosen on val.jsonl. Made by scripts/train-eval.sh."
}

if [[ $which == smollm2 || $which == all ]]; then
  heads smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf smollm2
  # A short gates run from the fitted heads: the first 160 training rows (the file is in
  # seeded random order), 2 epochs of batch 8, all sites and factors.
  head -n 160 $data/train.jsonl > "$work/gates-160.jsonl"
  $so8t train --model "$work/smollm2-135m-heads" --data "$work/gates-160.jsonl" --val $data/val.jsonl \
    --mode gates --epochs 2 --batch 8 --lr 5e-4 --head-lr 1e-5 --pet-max 0.1 --seed 1 --out "$work/smollm2-135m-gates" \
    | tee "$work/smollm2-135m-gates.json"
  $so8t eval --model "$work/smollm2-135m-gates" --data $data/test.jsonl --report eval/smollm2-135m-gates \
    --notes "smollm2-135m from the heads fit above, then \`so8t train --mode gates\` (160 rows, 2 epochs, batch 8, lr 5e-4, head lr 1e-5, λ_max 0.1, all sites and factors); thresholds (5% FPR) chosen on val.jsonl. Made by scripts/train-eval.sh."
  mkdir -p eval/smollm2-135m/model
  cp "$work/smollm2-135m-gates/so8t_adapter.safetensors" "$work/smollm2-135m-gates/so8t_config.json" eval/smollm2-135m/model/
fi
if [[ $which == qwen25coder || $which == all ]]; then
  heads qwen2.5-coder-0.5b qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen25coder
  head -n 160 $data/train.jsonl > "$work/gates-160.jsonl"
  # Qwen's final hidden states are larger: its L_PET starts near 200 (SmolLM2's near 10),
  # so λ_max is scaled down to keep the PET term of the same size as the other terms.
  $so8t train --model "$work/qwen2.5-coder-0.5b-heads" --data "$work/gates-160.jsonl" --val $data/val.jsonl \
    --mode gates --epochs 2 --batch 8 --lr 5e-4 --head-lr 1e-5 --pet-max 0.005 --seed 1 --out "$work/qwen2.5-coder-0.5b-gates" \
    | tee "$work/qwen2.5-coder-0.5b-gates.json"
  $so8t eval --model "$work/qwen2.5-coder-0.5b-gates" --data $data/test.jsonl --report eval/qwen2.5-coder-0.5b-gates \
    --notes "qwen2.5-coder-0.5b from the heads fit above, then \`so8t train --mode gates\` (160 rows, 2 epochs, batch 8, lr 5e-4, head lr 1e-5, λ_max 0.005: Qwen's L_PET is ~20× SmolLM2's, all sites and factors); thresholds (5% FPR) chosen on val.jsonl. Made by scripts/train-eval.sh."
fi
