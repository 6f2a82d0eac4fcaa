#!/usr/bin/env bash
# The heads pass (issue 19, item 4): the hidden state at each row's verdict position over
# the prompts of the first N rows of data/safety/train.jsonl (answers dropped: the peer
# reads prompts only), so8t against transformers (PyTorch CPU, bench/hidden_states_transformers.py)
# on the same f32 SmolLM2-135M directory and chat template, 2 threads each, in R
# alternating rounds (so8t, transformers, so8t, …). Prints each round's seconds and the
# median ratio transformers / so8t (above 1: so8t faster) with its range.
#
#   bench/heads_pass.sh [N=200] [R=5]
# Needs the Python venv of scripts/reference (torch, transformers) at $PY.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
rounds="${2:-5}"
cache="${SO8T_CACHE:-$HOME/.cache/so8t}"
PY="${PY:-$cache/pyref/bin/python}"
cargo build --release -p so8t-cli >/dev/null 2>&1
so8t=target/release/so8t
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
bash scripts/fetch-models.sh smollm2 >/dev/null
$so8t convert "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$work/m" >/dev/null 2>&1
head -n "$n" data/safety/train.jsonl | jq -c 'del(.response, .response_safety, .response_authority)' > "$work/rows.jsonl"
echo "# $(date -u +%FT%RZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD); $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
echo "# heads pass over the prompts of $n rows, 2 threads; seconds of features"
ratios=()
for r in $(seq "$rounds"); do
  rm -rf "$work/h"
  $so8t -t 2 train --model "$work/m" --data "$work/rows.jsonl" --mode heads --out "$work/h" >/dev/null 2>&1
  ours=$(jq -r .feature_seconds "$work/h/so8t_train/summary.json")
  theirs=$(OMP_NUM_THREADS=2 "$PY" bench/hidden_states_transformers.py "$work/m" "$work/rows.jsonl" 2>/dev/null | sed -E 's/^transformers: ([0-9.]+) s.*/\1/')
  ratio=$(echo "$theirs / $ours" | bc -l)
  ratios+=("$ratio")
  printf 'round %d: so8t %.2f s, transformers %.2f s, ratio %.3f\n' "$r" "$ours" "$theirs" "$ratio"
done
printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR]=$1} END {m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2; printf "transformers / so8t: median %.3fx (range %.3f-%.3f, %d rounds)\n", m, v[1], v[NR], NR}'
