#!/usr/bin/env bash
# A change against the so8t binary from before it, with llama.cpp as the yardstick:
# so8t bench (this tree), so8t bench (BASELINE) and llama-bench on one GGUF, prompt
# processing (pp512) and decoding (tg32) on 2 threads, in alternating rounds. Prints each
# round and the median ratios with their range.
#
#   bench/baseline.sh BASELINE_SO8T [ROUNDS] [MODEL] [LLAMA_MODEL.gguf]
#
# MODEL may be an SO8T or HF directory; llama-bench then reads LLAMA_MODEL (e.g. the
# directory's own f32 export), which defaults to MODEL.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
BASE="$1"
R="${2:-5}"
M="${3:-$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf}"
LM="${4:-$M}"
LLAMA="$CACHE/llama.cpp/build/bin/llama-bench"
cargo build --release -q -p so8t-cli
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD) (+ working tree) vs $BASE; $(basename "$M") (llama.cpp: $(basename "$LM")), pp512 and tg32, 2 threads"
so8t_ts() { # BINARY -p N -n N
  "$1" bench -m "$M" -p "$2" -n "$3" -r 1 -t 2 --json --no-probe 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tests"][0]["avg_ts"])'; }
llama_ts() { "$LLAMA" -m "$LM" -p "$1" -n "$2" -r 1 -t 2 -o json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'; }
rows=()
for i in $(seq "$R"); do
  row=""
  for t in "512 0" "0 32"; do
    set -- $t
    ours=$(so8t_ts target/release/so8t "$1" "$2")
    base=$(so8t_ts "$BASE" "$1" "$2")
    theirs=$(llama_ts "$1" "$2")
    row="$row $ours $base $theirs"
  done
  echo "round $i: pp512 so8t / baseline / llama.cpp t/s:$(echo $row | cut -d' ' -f1-3); tg32:$(echo $row | cut -d' ' -f4-6)"
  rows+=("$row")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
rows = [[float(v) for v in l.split()] for l in sys.stdin]
for name, o in (("pp512", 0), ("tg32", 3)):
    for peer, j in (("baseline so8t", 1), ("llama.cpp", 2)):
        r = [x[o] / x[o + j] for x in rows]
        print(f"{name}: so8t / {peer}: median {statistics.median(r):.3f}x (range {min(r):.3f}-{max(r):.3f}, {len(r)} rounds)")
'
