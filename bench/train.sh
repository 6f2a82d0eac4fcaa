#!/usr/bin/env bash
# Training speed on SmolLM2-135M (SO8T directory from the Q4_1 GGUF, f32), 2 threads:
#  1. the heads pass (final hidden state at each row's verdict position) over the first
#     N rows of data/safety/train.jsonl: so8t vs transformers (PyTorch, CPU) on the same
#     directory, same chat template;
#  2. one gates step (batch 8, all sites and factors, forward + backward + AdamW).
#
#   bench/train.sh [N=200]
# Needs the Python venv of scripts/reference (torch, transformers) at $PY.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
cache="${SO8T_CACHE:-$HOME/.cache/so8t}"
PY="${PY:-$cache/pyref/bin/python}"
cargo build --release -p so8t-cli >/dev/null 2>&1
so8t=target/release/so8t
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
bash scripts/fetch-models.sh smollm2 >/dev/null
$so8t convert "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$work/m" >/dev/null 2>&1
head -n "$n" data/safety/train.jsonl > "$work/rows.jsonl"
head -n 16 data/safety/train.jsonl > "$work/gates.jsonl"
echo "# $(date -u +%FT%RZ), $(nproc) cores, so8t $(git rev-parse --short HEAD)"
echo "## heads pass over $n rows, 2 threads"
$so8t -t 2 train --model "$work/m" --data "$work/rows.jsonl" --mode heads --out "$work/h" >/dev/null 2>&1
echo "so8t:         $(jq -r .feature_seconds "$work/h/so8t_train/summary.json" | xargs printf '%.1f') s of features"
OMP_NUM_THREADS=2 "$PY" bench/hidden_states_transformers.py "$work/m" "$work/rows.jsonl" 2>/dev/null
echo "## gates steps (batch 8; the first step also touches the weights)"
/usr/bin/time -f "%e s wall, %U s user, %S s system, %M KB max RSS" -o "$work/time" \
  $so8t -t 2 train --model "$work/m" --data "$work/gates.jsonl" --mode gates --batch 8 --stop-after 2 --out "$work/g" >/dev/null 2>&1
echo "so8t: steps $(jq -r .seconds "$work/g/so8t_train/log.jsonl" | xargs printf '%.1f s '); whole run $(cat "$work/time")"
