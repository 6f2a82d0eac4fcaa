#!/usr/bin/env bash
# Time to first token with a shared system prompt (prefix reuse): so8t serve and
# llama-server on the same GGUF (the trained SO8T SmolLM2-135M at Q8_0), 2 threads each,
# both up, one client visiting them in alternating rounds (bench/prefix_reuse.py).
#
#   bench/prefix_reuse.sh [ROUNDS] [WORDS]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
R="${1:-5}"; W="${2:-300}"
cargo build --release -q -p so8t-cli
MODEL="$(scripts/trained-smollm2.sh)"
LS="$CACHE/llama.cpp/build/bin/llama-server"
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD); $(basename "$MODEL"), system prompt of $W words, $R rounds"
wait_up() { for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "server at $1 did not come up" >&2; return 1; }
./target/release/so8t -t 2 serve -m "$MODEL" --port 18191 --parallel 2 2>/tmp/so8t-prefix-bench.log &
A=$!
"$LS" -m "$MODEL" --port 18192 -t 2 -np 2 -c 4096 --log-disable 2>/tmp/llama-prefix-bench.log &
B=$!
trap 'kill $A $B 2>/dev/null; wait $A $B 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:18191
wait_up http://127.0.0.1:18192
python3 bench/prefix_reuse.py so8t=http://127.0.0.1:18191 llama-server=http://127.0.0.1:18192 --rounds "$R" --words "$W"
