#!/usr/bin/env bash
# Decoding beside another busy process: so8t bench and llama-bench, tg32 on 2 threads,
# while `yes > /dev/null` keeps one core busy, in alternating paired rounds (so8t,
# llama.cpp, …). Prints each round and the median so8t/llama.cpp ratio with its range.
# With SO8T_BASELINE=path/to/an/older/so8t, that binary runs as a third member of each
# round (to show what a change to the thread pool gains); with BUSY=0 no core is kept
# busy (the same comparison on an idle machine, to show the change costs nothing there).
#
#   bench/contention.sh [ROUNDS] [MODEL.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
R="${1:-5}"
M="${2:-$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf}"
LLAMA="$CACHE/llama.cpp/build/bin/llama-bench"
cargo build --release -q -p so8t-cli
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
BUSY="${BUSY:-1}"
echo "# so8t $(git rev-parse --short HEAD); $(basename "$M"), tg32, 2 threads, $([ "$BUSY" = 1 ] && echo "one core kept busy" || echo "idle machine")"
so8t_tg() { "$1" bench -m "$M" -p 0 -n 32 -r 1 -t 2 --json --no-probe 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["tests"][0]["avg_ts"])'; }
llama_tg() { "$LLAMA" -m "$M" -p 0 -n 32 -r 1 -t 2 -o json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'; }
if [ "$BUSY" = 1 ]; then
  yes > /dev/null &
  hog=$!
  trap 'kill $hog' EXIT
fi
rows=()
for i in $(seq "$R"); do
  ours=$(so8t_tg target/release/so8t)
  theirs=$(llama_tg)
  base=-
  [ -n "${SO8T_BASELINE:-}" ] && base=$(so8t_tg "$SO8T_BASELINE")
  echo "round $i: so8t $ours t/s, llama.cpp $theirs t/s, baseline so8t $base t/s"
  rows+=("$ours $theirs $base")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
rows = [l.split() for l in sys.stdin]
def report(name, i):
    r = [float(x[0]) / float(x[i]) for x in rows]
    print(f"so8t / {name}: median {statistics.median(r):.2f}x (range {min(r):.2f}-{max(r):.2f}, {len(r)} rounds)")
report("llama.cpp", 1)
if rows[0][2] != "-":
    report("baseline so8t", 2)
'
