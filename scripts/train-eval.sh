#!/usr/bin/env bash
# Trains and evaluates the SO8T heads (and a short gates run) on the real small models,
# writing the committed reports under eval/ and the trained adapters under
# eval/<model>/model (crates/so8t/tests/real_train.rs checks the SmolLM2 one). Work files
# go to target/train-eval/.
#
#   scripts/train-eval.sh [smollm2|qwen25coder|all] [score]      (default: smollm2)
#
# `score` only scores the heads trained by an earlier run (target/train-eval/NAME-heads)
# again, e.g. after a change to `eval`'s report.
#
# The layer is chosen on data/safety/val.jsonl; the answer weight and weight decay by the
# loss on whole training families held out in turn, and the thresholds on the scores those
# held-out fits give (`--answer-weight auto --thresholds-from families`). test.jsonl (same
# families), test_families.jsonl (families never trained on) and own_answers_<model>.jsonl
# (the base model's own greedy answers to benign prompts of the held-out families, made by
# scripts/data/own_answers.py) are only scored.
# Times on the 2-core machine are in README ("Training results").
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-smollm2}"
only_score="${2:-}"
cargo build --release -p so8t-cli
so8t=target/release/so8t
cache="${SO8T_CACHE:-$HOME/.cache/so8t}"
work=target/train-eval
mkdir -p "$work"
data=data/safety

evaluate() { # model-dir report-name notes
  # What ships: the Q8_0 export (heads and settings in its metadata), on the kernels.
  $so8t export "$1" --out "$work/$2.q8_0.gguf" --quant q8_0 --force
  $so8t eval --model "$work/$2.q8_0.gguf" --data $data/test.jsonl --report "eval/$2" \
    --notes "$3 Scored as its Q8_0 GGUF export on test.jsonl (the training families' held-out rows)."
  $so8t eval --model "$work/$2.q8_0.gguf" --data $data/test_families.jsonl --report "eval/$2-families" \
    --notes "$3 Scored as its Q8_0 GGUF export on test_families.jsonl: whole families never seen in training or validation (data/safety/MAPPING.md)."
  local own=$data/own_answers_${2%-heads}.jsonl
  if [[ -f $own ]]; then
    $so8t eval --model "$work/$2.q8_0.gguf" --data "$own" --report "eval/$2-own-answers" \
      --notes "$3 Scored as its Q8_0 GGUF export on $(basename "$own"): the base model's own greedy answers (48 tokens) to benign prompts of the held-out families (scripts/data/own_answers.py); every answer is labelled safe, so this measures benign answers flagged."
  fi
}

heads() { # name gguf fetch-name [train args…]
  local name=$1 gguf=$2 fetch=$3; shift 3
  local notes="$name, zero gates; heads fitted by \`so8t train --mode heads --layer auto --features-quant q8_0 --answer-weight auto --thresholds-from families\` on data/safety/train.jsonl (fitted on prompts and 16 tokens of each answer, hidden states from the Q8_0-quantised weights); layer chosen on val.jsonl; answer weight and weight decay by the loss on training families held out in turn (5 folds); thresholds at 5% FPR on those held-out-family scores (prompts, and benign answers under the streaming rule with k = 2 over all their tokens). Made by scripts/train-eval.sh."
  if [[ $only_score == score ]]; then
    evaluate "$work/$name-heads" "$name-heads" "$notes"
    return
  fi
  bash scripts/fetch-models.sh "$fetch"
  $so8t convert "$cache/$gguf" --out "$work/$name" --force
  $so8t train --model "$work/$name" --data $data/train.jsonl --val $data/val.jsonl --mode heads \
    --layer auto --features-quant q8_0 --answer-weight auto --thresholds-from families \
    --features-cache "$work/features" --out "$work/$name-heads" --force "$@" | tee "$work/$name-heads.json"
  evaluate "$work/$name-heads" "$name-heads" "$notes"
  mkdir -p "eval/$name/model"
  cp "$work/$name-heads/so8t_adapter.safetensors" "$work/$name-heads/so8t_config.json" "eval/$name/model/"
}

if [[ $which == smollm2 || $which == all ]]; then
  heads smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf smollm2
fi
if [[ $which == qwen25coder || $which == all ]]; then
  heads qwen2.5-coder-0.5b qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen25coder
fi
