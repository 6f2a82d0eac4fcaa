#!/usr/bin/env bash
# Trains and evaluates the SO8T heads (and, with smollm2-gates, gates) on the real small models,
# writing the committed reports under eval/ and the trained adapters under
# eval/<model>/model (crates/so8t/tests/real_train.rs checks the SmolLM2 one). Work files
# go to target/train-eval/.
#
#   scripts/train-eval.sh [smollm2|smollm2-gates|qwen25coder|qwen25coder-answer-tokens|qwen25coder-multi-turn|qwen25coder-long-answers|all] [score|multi-turn|long-answers]   (default: smollm2)
#
# `score` only scores the heads trained by an earlier run (target/train-eval/NAME-heads)
# again, e.g. after a change to `eval`'s report; `multi-turn` scores them on the
# conversation files only, `long-answers` on the model's own long answers only (below).
#
# The layer is chosen on data/safety/val.jsonl; the answer weight and weight decay by the
# loss on whole training families held out in turn, and the thresholds on the scores those
# held-out fits give (`--answer-weight auto --thresholds-from families`). test.jsonl (same
# families), test_families.jsonl (families never trained on) and own_answers_<model>.jsonl
# (the model's own greedy answers to benign prompts of the held-out families, made by
# scripts/data/own_answers.py when the file is missing) are only scored.
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
# The recipe in words, for the reports' notes: $1 is the streaming rule's k (2 is `train`'s
# default, so a fit that passes no --consecutive is named with 2).
heads_recipe() {
  echo "heads fitted by \`so8t train --mode heads --layer auto --features-quant q8_0 --answer-weight auto --thresholds-from families --consecutive $1\` on data/safety/train.jsonl (fitted on prompts and 16 tokens of each answer, hidden states from the Q8_0-quantised weights); layer chosen on val.jsonl; answer weight and weight decay by the loss on training families held out in turn (5 folds); thresholds at 5% FPR on those held-out-family scores (prompts, and benign answers under the streaming rule with k = $1 over all their tokens). Made by scripts/train-eval.sh."
}

# Scores the Q8_0 export of report-name on one file of rows, into eval/<report-name><suffix>.
score() { # report-name report-suffix notes rows.jsonl what-the-rows-are
  $so8t eval --model "$work/$1.q8_0.gguf" --data "$4" --report "eval/$1$2" \
    --notes "$3 Scored as its Q8_0 GGUF export on $(basename "$4")$5"
}

# The model's own answers, made by the model being scored when they are not there yet.
own_answers() { # report-name answers.jsonl [scripts/data/own_answers.py args…]
  [[ -f $2 ]] || python3 scripts/data/own_answers.py "$work/$1.q8_0.gguf" "$2" "${@:3}"
}

evaluate() { # model-dir report-name notes own-answers.jsonl
  # What ships: the Q8_0 export (heads and settings in its metadata), on the kernels.
  $so8t export "$1" --out "$work/$2.q8_0.gguf" --quant q8_0 --force
  # First the files recipes are compared on (val), then the tests.
  evaluate_val_and_conversations "$2" "$3"
  score "$2" "" "$3" $data/test.jsonl " (the training families' held-out rows)."
  score "$2" -families "$3" $data/test_families.jsonl ": whole families never seen in training or validation (data/safety/MAPPING.md)."
  own_answers "$2" "$4"
  score "$2" -own-answers "$3" "$4" ": the model's own greedy answers (48 tokens) to benign prompts of the held-out families (scripts/data/own_answers.py); every answer is labelled safe, so this measures benign answers flagged."
}

# Conversations: the same rows after one or two benign turns (data/safety/*_multi_turn.jsonl,
# built with the rest of the set; MAPPING.md). val.jsonl and its conversations are scored
# too, since a choice between recipes is made on them, never on a test file.
evaluate_val_and_conversations() { # report-name notes
  score "$1" -val "$2" $data/val.jsonl " (the training families' validation rows), where recipes are compared."
  score "$1" -val-multi-turn "$2" $data/val_multi_turn.jsonl ": every val.jsonl row after one or two benign turns from val.jsonl, where recipes are compared."
  score "$1" -families-multi-turn "$2" $data/test_families_multi_turn.jsonl ": every row of the held-out families after one or two benign turns taken from test.jsonl."
}

# Long answers: own_answers_<model>.jsonl holds answers of 48 tokens and the data's answers
# are cut near 60, so the answer threshold was never set on a long benign answer, where a
# run of k high tokens has more chances. This generates the model's greedy answers of up to
# 256 tokens to 20 benign prompts of each held-out family, when the file is not there, and
# scores them (every answer is labelled safe: benign answers flagged, and where).
# The same for 50 benign prompts of each of four training families (train.jsonl), where a
# threshold could be chosen: does the training side see what the held-out side shows?
evaluate_long_answers() { # report-name notes answers.jsonl training-answers.jsonl
  evaluate_held_out_long_answers "$1" "$2" "$3"
  own_answers "$1" "$4" --per-family 50 --max-tokens 256 --rows $data/train.jsonl --families coconot_pref,alpaca,rd_harmless,bitext
  score "$1" -own-long-answers-train "$2" "$4" ": the model's own greedy answers of up to 256 tokens to 50 benign prompts of each of four training families of train.jsonl (coconot_pref, alpaca, rd_harmless, bitext; scripts/data/own_answers.py); every answer is labelled safe."
}

evaluate_held_out_long_answers() { # report-name notes answers.jsonl
  own_answers "$1" "$3" --per-family 20 --max-tokens 256
  score "$1" -own-long-answers "$2" "$3" ": the model's own greedy answers of up to 256 tokens to 20 benign prompts of each held-out family with safe prompts (scripts/data/own_answers.py --per-family 20 --max-tokens 256); every answer is labelled safe, so this measures benign long answers flagged."
}

# The heads recipe: layer, answer weight, weight decay and thresholds as described above.
fit_heads() { # model-dir out-dir [train args…, e.g. another --data to fit on it too]
  local model=$1 out=$2; shift 2
  $so8t train --model "$model" --data $data/train.jsonl --val $data/val.jsonl --mode heads \
    --layer auto --features-quant q8_0 --answer-weight auto --thresholds-from families \
    --features-cache "$work/features" --out "$out" --force "$@" | tee "$out.json"
}

heads() { # name gguf fetch-name k [train args…]
  local name=$1 gguf=$2 fetch=$3 k=$4; shift 4
  local notes="$name, zero gates; $(heads_recipe "$k")"
  if [[ $only_score == score ]]; then
    evaluate "$work/$name-heads" "$name-heads" "$notes" "$data/own_answers_$name.jsonl"
    return
  fi
  if [[ $only_score == multi-turn ]]; then
    evaluate_val_and_conversations "$name-heads" "$notes"
    return
  fi
  if [[ $only_score == long-answers ]]; then
    evaluate_long_answers "$name-heads" "$notes" "$data/own_long_answers_$name.jsonl" "$data/own_long_answers_train_$name.jsonl"
    return
  fi
  bash scripts/fetch-models.sh "$fetch"
  $so8t convert "$cache/$gguf" --out "$work/$name" --force
  fit_heads "$work/$name" "$work/$name-heads" --consecutive "$k" "$@"
  mkdir -p "eval/$name-heads"
  cp "$work/$name-heads.json" "eval/$name-heads/train.json"
  evaluate "$work/$name-heads" "$name-heads" "$notes" "$data/own_answers_$name.jsonl"
  mkdir -p "eval/$name/model"
  cp "$work/$name-heads/so8t_adapter.safetensors" "$work/$name-heads/so8t_config.json" "eval/$name/model/"
}

# Item 7 of #13: what the rotations buy. From the heads-only model that heads() left in
# $work/NAME-heads, `train --mode gates` trains every site's generators jointly with both
# heads (the loss on prompts and on every answer token, plus the LM loss and PET) for one
# epoch over every GATES_EVERY-th training row; then the heads are fitted again on the
# gated model by the same recipe as heads-only, so the two differ by the gates alone. The
# gated model's own answers are generated again (its answers are what it would serve), and
# the LM is checked against the base: perplexity by llama.cpp's llama-perplexity on the
# held-out rows' benign answers, and the greedy answers to the own-answer prompts.
gates() { # name gguf fetch-name
  local name=$1 gguf=$2 fetch=$3
  local start="$work/$name-heads" gated="$work/$name-gates" every="${GATES_EVERY:-4}"
  local notes="$name with trained gates (\`so8t train --mode gates\`, every site, one epoch over every ${every}th row of data/safety/train.jsonl, started from the heads-only model), then the heads fitted again: $(heads_recipe 2)"
  if [[ ! -f $start/so8t_adapter.safetensors ]]; then
    # The committed heads-only model (what heads() last wrote), on its base.
    bash scripts/fetch-models.sh "$fetch"
    $so8t convert "$cache/$gguf" --out "$start" --force
    cp "eval/$name/model/"so8t_* "$start/"
    $so8t validate "$start"
  fi
  [[ -f $start.q8_0.gguf ]] || $so8t export "$start" --out "$start.q8_0.gguf" --quant q8_0 --force
  bash scripts/build-llama-cpp.sh >&2   # llama-perplexity, for lm_drift.py
  if [[ $only_score != score ]]; then
    awk -v k="$every" 'NR % k == 1' $data/train.jsonl > "$work/gates-rows.jsonl"
    /usr/bin/time -f "gates run: %e s" $so8t train --model "$work/$name-heads" --data "$work/gates-rows.jsonl" \
      --mode gates --epochs 1 --out "$gated" --force | tee "$gated.json"
    fit_heads "$gated" "$gated-heads"
  fi
  [[ $only_score == score ]] || rm -f "$work/own_answers_$name-gates.jsonl"
  evaluate "$gated-heads" "$name-gates-heads" "$notes" "$work/own_answers_$name-gates.jsonl"
  python3 scripts/data/lm_drift.py --base "$work/$name-heads.q8_0.gguf" --gated "$work/$name-gates-heads.q8_0.gguf" \
    --base-answers "$data/own_answers_$name.jsonl" --gated-answers "$work/own_answers_$name-gates.jsonl" \
    --out "eval/$name-gates-heads/lm_drift.json"
}

# An experiment on the answer side of #13, not shipped: the heads recipe with the fit taking 16
# (as shipped) or 64 (every token of the data's answers, cut at 240 characters) tokens of
# each answer, from one pass. Each run's summary (train.json) holds `held_out_answers`: per
# training family, its answers scored by fits that never saw the family, the training-side
# measure the choice is made on; the test files are scored after it.
answer_tokens() { # name gguf fetch-name
  local name=$1 gguf=$2 fetch=$3
  if [[ $only_score != score ]]; then
    bash scripts/fetch-models.sh "$fetch"
    $so8t convert "$cache/$gguf" --out "$work/$name" --force
  fi
  for n in 16 64; do
    local run="$name-answer-tokens/tokens$n"
    mkdir -p "$work/$name-answer-tokens" "eval/$name-answer-tokens"
    [[ $only_score == score ]] || fit_heads "$work/$name" "$work/$run" --response-tokens "$n"
    cp "$work/$run.json" "eval/$run-train.json"
    evaluate "$work/$run" "$run" "$name, zero gates; $(heads_recipe 2 | sed "s/16 tokens/$n tokens/") (The answer-tokens experiment; not shipped.)" "$data/own_answers_$name.jsonl"
  done
}

variant_notes() { # name k what-is-fitted-on
  echo "$1, zero gates; $(heads_recipe "$2" | sed "s|on data/safety/train.jsonl|on $3|")"
}

# A recipe variant for an experiment: the heads recipe with more rows (further --data
# files) fitted into $work/NAME-VARIANT and scored like the shipped heads. Each experiment's
# rule for replacing the shipped heads is written at its call below, before any test file
# was scored with it; shipping one is done by hand (adapter to eval/NAME/model, sha256 in
# scripts/trained-model.sh), never by this script.
variant_heads() { # name gguf fetch-name k variant what-is-fitted-on [train args…]
  local name=$1 gguf=$2 fetch=$3 k=$4 run="$1-$5" rows=$6; shift 6
  local notes; notes=$(variant_notes "$name" "$k" "$rows")
  if [[ $only_score != score ]]; then
    bash scripts/fetch-models.sh "$fetch"
    $so8t convert "$cache/$gguf" --out "$work/$name" --force
    # train.jsonl's hidden states come from the feature cache of the shipped fit.
    fit_heads "$work/$name" "$work/$run" --consecutive "$k" "$@"
  fi
  mkdir -p "eval/$run"
  cp "$work/$run.json" "eval/$run/train.json"
  evaluate "$work/$run" "$run" "$notes" "$data/own_answers_$name.jsonl"
}

# The streaming rule's k per model. Qwen2.5-Coder's is 8, chosen on its training side
# before the test files were scored with it: on training families held out in turn
# (held_out_answers_by_consecutive of the k = 2 fit, eval/qwen2.5-coder-0.5b-answer-tokens/
# tokens16-train.json), each k at its own threshold for 5% of benign answers, the pooled
# answer F1 was 0.820 / 0.771 / 0.834 / 0.844 for k = 1 / 2 / 4 / 8 (AUROC 0.958 / 0.956 /
# 0.961 / 0.964), the prompt verdicts the same. The cost is that no answer is stopped
# before its 8th token. SmolLM2's shipped heads keep k = 2 (not refitted).
if [[ $which == smollm2 || $which == all ]]; then
  heads smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf smollm2 2
fi
if [[ $which == smollm2-gates ]]; then
  gates smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf smollm2
fi
if [[ $which == qwen25coder || $which == all ]]; then
  heads qwen2.5-coder-0.5b qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen25coder 8
fi
# Conversations (#13): benign earlier turns shift the shipped heads' scores (p_unsafe up,
# p_escalate down; README), and every training row was single-turn. The recipe on
# train.jsonl plus train_multi_turn.jsonl (every 5th training row again after one or two
# benign turns). It replaces the shipped heads if, against them, its prompt safety F1 on
# val_multi_turn.jsonl rises and neither its prompt nor its answer safety F1 on val.jsonl
# falls by more than 0.01 (each at its own stored thresholds); and (added after the shipped
# heads were scored in conversation, where escalation suffered most) its authority F1 on
# neither file falls by more than 0.01.
if [[ $which == qwen25coder-multi-turn ]]; then
  variant_heads qwen2.5-coder-0.5b qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen25coder 8 multi-turn \
    "data/safety/train.jsonl and train_multi_turn.jsonl (conversations)" --data $data/train_multi_turn.jsonl
fi
# Long answers (#13): the shipped heads flag 6% of the model's own benign answers of up to
# 256 tokens to training families' prompts (10% on the held-out side), and no answer they
# were fitted or thresholded on was longer than ~60 tokens. The recipe on train.jsonl plus
# those 200 answers (own_long_answers_train_<model>.jsonl: 50 per family of coconot_pref,
# alpaca, rd_harmless and bitext, labelled safe; their families are own_answers_*, so the
# recipe holds each out in turn like any other). It replaces the shipped heads if, in its
# train.json, the four own_answers_* families' answers scored by fits that never saw them
# (held_out_answers, safety) are flagged at most 5% pooled, and on val.jsonl neither its
# prompt nor its answer safety F1 nor its prompt authority F1 falls by more than 0.01
# against the shipped heads. Its held-out long answers are scored after that.
if [[ $which == qwen25coder-long-answers ]]; then
  n=qwen2.5-coder-0.5b
  rows="data/safety/train.jsonl and own_long_answers_train_$n.jsonl (the model's own benign answers of up to 256 tokens)"
  variant_heads $n qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen25coder 8 long-answers "$rows" \
    --data $data/own_long_answers_train_$n.jsonl
  evaluate_held_out_long_answers "$n-long-answers" "$(variant_notes $n 8 "$rows")" $data/own_long_answers_$n.jsonl
fi
if [[ $which == qwen25coder-answer-tokens ]]; then
  answer_tokens qwen2.5-coder-0.5b qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen25coder
fi
