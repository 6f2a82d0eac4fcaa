#!/usr/bin/env bash
# Training speed on SmolLM2-135M (SO8T directory from the Q4_1 GGUF, f32), 2 threads:
#  1. the heads pass against transformers, paired: bench/heads_pass.sh N 5;
#  2. one gates step (batch 8, all sites and factors, forward + backward + AdamW).
#
#   bench/train.sh [N=200]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
cache="${SO8T_CACHE:-$HOME/.cache/so8t}"
cargo build --release -p so8t-cli >/dev/null 2>&1
so8t=target/release/so8t
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
bash scripts/fetch-models.sh smollm2 >/dev/null
$so8t convert "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$work/m" >/dev/null 2>&1
head -n 16 data/safety/train.jsonl > "$work/gates.jsonl"
bench/heads_pass.sh "$n" 5
echo "# $(date -u +%FT%RZ), $(nproc) cores, so8t $(git rev-parse --short HEAD)"
echo "## gates steps (batch 8; the first step also touches the weights)"
/usr/bin/time -f "%e s wall, %U s user, %S s system, %M KB max RSS" -o "$work/time" \
  $so8t -t 2 train --model "$work/m" --data "$work/gates.jsonl" --mode gates --batch 8 --stop-after 2 --out "$work/g" >/dev/null 2>&1
echo "so8t: steps $(jq -r .seconds "$work/g/so8t_train/log.jsonl" | xargs printf '%.1f s '); whole run $(cat "$work/time")"
