#!/usr/bin/env bash
# Two models in the same so8t binary, alternating: an SO8T or HF directory against its own
# GGUF export, say. pp512 and tg32 on 2 threads per round; prints each round and the
# median ratio A / B with its range.
#
#   bench/models.sh MODEL_A MODEL_B [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
A="$1"
B="$2"
R="${3:-7}"
cargo build --release -q -p so8t-cli
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD); A $(basename "$A"), B $(basename "$B"); pp512 and tg32, 2 threads"
ts() { # MODEL PROMPT GEN
  target/release/so8t bench -m "$1" -p "$2" -n "$3" -r 1 -t 2 --json --no-probe 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tests"][0]["avg_ts"])'; }
rows=()
for i in $(seq "$R"); do
  row="$(ts "$A" 512 0) $(ts "$B" 512 0) $(ts "$A" 0 32) $(ts "$B" 0 32)"
  echo "round $i: pp512 A / B t/s: $(echo $row | cut -d' ' -f1-2); tg32 A / B t/s: $(echo $row | cut -d' ' -f3-4)"
  rows+=("$row")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
rows = [[float(v) for v in l.split()] for l in sys.stdin]
for name, o in (("pp512", 0), ("tg32", 2)):
    r = [x[o] / x[o + 1] for x in rows]
    print(f"{name}: A / B: median {statistics.median(r):.3f}x (range {min(r):.3f}-{max(r):.3f}, {len(r)} rounds)")
'
