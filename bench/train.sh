#!/usr/bin/env bash
# Training speed on SmolLM2-135M (SO8T directory from the Q4_1 GGUF, f32), 2 threads:
#  1. the heads pass (final hidden state at each row's verdict position) over the first
#     N rows of data/safety/train.jsonl: so8t vs transformers (PyTorch, CPU) on the same
#     directory, same chat template;
#  2. one gates step (batch 8, all sites and factors, forward + backward + AdamW) with
#     and without so8t's heap tuning (SO8T_NO_HEAP_TUNING=1).
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
s=$( { /usr/bin/time -f %e $so8t -t 2 train --model "$work/m" --data "$work/rows.jsonl" --mode heads --out "$work/h" >/dev/null 2>/dev/null; } 2>&1 | tail -1)
echo "so8t:         $(jq -r .feature_seconds "$work/h/so8t_train/summary.json" | xargs printf '%.1f') s of features ($s s with loading and the fit)"
OMP_NUM_THREADS=2 "$PY" bench/hidden_states_transformers.py "$work/m" "$work/rows.jsonl"
echo "## gates step (batch 8, 2 steps, the first one excluded: it touches the weights)"
for mode in tuned default; do
  rm -rf "$work/g"
  env $([ $mode = default ] && echo SO8T_NO_HEAP_TUNING=1) /usr/bin/time -f "%e s wall, %U s user, %S s system, %M KB max RSS" \
    $so8t -t 2 train --model "$work/m" --data "$work/gates.jsonl" --mode gates --batch 8 --stop-after 2 --out "$work/g" 2> "$work/err" >/dev/null || true
  echo "heap $mode: step 2 $(sed -n 2p "$work/g/so8t_train/log.jsonl" | jq .seconds | xargs printf '%.1f') s; whole run $(tail -1 "$work/err")"
done
