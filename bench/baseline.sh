#!/usr/bin/env bash
# A change against the so8t binary from before it, with llama.cpp as the yardstick:
# so8t bench (this tree), so8t bench (BASELINE) and llama-bench on one GGUF, prompt
# processing (pp512), decoding (tg32) and decoding after a 512-token context
# (tg32 @ d512, llama-bench's -d) on 2 threads, in alternating rounds. Prints each round
# and the median ratios with their range. BASELINE must know `bench -d` (any build since
# it was added; DEPTH=0 leaves that test out for older ones).
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
DEPTH="${DEPTH:-512}"
tests=("512 0 0" "0 32 0")
[ "$DEPTH" = 0 ] || tests+=("0 32 $DEPTH")
cargo build --release -q -p so8t-cli
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
names=()
for t in "${tests[@]}"; do
  set -- $t
  if [ "$1" != 0 ]; then n="pp$1"; else n="tg$2"; fi
  [ "$3" = 0 ] || n="$n@d$3"
  names+=("$n")
done
echo "# so8t $(git rev-parse --short HEAD) (+ working tree) vs $BASE; $(basename "$M") (llama.cpp: $(basename "$LM")), ${names[*]}, 2 threads"
so8t_ts() { # BINARY PROMPT GEN DEPTH
  local d=(); [ "$4" = 0 ] || d=(-d "$4")
  "$1" bench -m "$M" -p "$2" -n "$3" "${d[@]}" -r 1 -t 2 --json --no-probe 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tests"][0]["avg_ts"])'; }
llama_ts() { # PROMPT GEN DEPTH
  "$LLAMA" -m "$LM" -p "$1" -n "$2" -d "$3" -r 1 -t 2 -o json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'; }
rows=()
for i in $(seq "$R"); do
  row=""
  line="round $i:"
  for k in "${!tests[@]}"; do
    set -- ${tests[$k]}
    ours=$(so8t_ts target/release/so8t "$1" "$2" "$3")
    base=$(so8t_ts "$BASE" "$1" "$2" "$3")
    theirs=$(llama_ts "$1" "$2" "$3")
    row="$row $ours $base $theirs"
    line="$line ${names[$k]} so8t / baseline / llama.cpp t/s: $ours $base $theirs;"
  done
  echo "$line"
  rows+=("$row")
done
printf '%s\n' "${rows[@]}" | NAMES="${names[*]}" python3 -c '
import os, statistics, sys
rows = [[float(v) for v in l.split()] for l in sys.stdin]
for t, name in enumerate(os.environ["NAMES"].split()):
    o = 3 * t
    for peer, j in (("baseline so8t", 1), ("llama.cpp", 2)):
        r = [x[o] / x[o + j] for x in rows]
        print(f"{name}: so8t / {peer}: median {statistics.median(r):.3f}x (range {min(r):.3f}-{max(r):.3f}, {len(r)} rounds)")
'
