#!/usr/bin/env bash
# One gates training step (batch 8, all sites and factors, forward + backward + AdamW) on
# SmolLM2-135M (SO8T directory from the Q4_1 GGUF, f32), 2 threads: this tree's so8t
# against BASELINE (an so8t binary from before a change), in alternating rounds. Each
# run takes two steps; the second is reported (the first also touches the weights).
#
#   bench/gates_step.sh BASELINE_SO8T [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="$1"
R="${2:-5}"
cache="${SO8T_CACHE:-$HOME/.cache/so8t}"
cargo build --release -q -p so8t-cli
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
bash scripts/fetch-models.sh smollm2 >/dev/null
target/release/so8t convert "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$work/m" >/dev/null 2>&1
head -n 16 data/safety/train.jsonl > "$work/gates.jsonl"
echo "# $(date -u +%FT%RZ), $(nproc) cores, so8t $(git rev-parse --short HEAD) (+ working tree) vs $BASE"
step() { # BINARY
  "$1" -t 2 train --model "$work/m" --data "$work/gates.jsonl" --mode gates --batch 8 --stop-after 2 \
    --out "$work/g" --force >/dev/null 2>&1
  jq -r .seconds "$work/g/so8t_train/log.jsonl" | tail -n 1
}
rows=()
for i in $(seq "$R"); do
  ours=$(step target/release/so8t)
  base=$(step "$BASE")
  echo "round $i: so8t $ours s, baseline $base s"
  rows+=("$ours $base")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
r = [float(a) / float(b) for a, b in (l.split() for l in sys.stdin)]
print(f"step time so8t / baseline: median {statistics.median(r):.3f}x (range {min(r):.3f}-{max(r):.3f}, {len(r)} rounds)")
'
