#!/usr/bin/env bash
# Load test: so8t serve and llama.cpp's llama-server on the same GGUF (the trained SO8T
# SmolLM2-135M at Q8_0), same slots, same threads, same closed-loop load, one run.
# Needs scripts/build-llama-cpp.sh; fetches the rest.
#
#   bench/serve.sh [CLIENTS] [SECONDS] [PARALLEL] [MAX_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
C="${1:-64}"; S="${2:-120}"; P="${3:-4}"; N="${4:-16}"
cargo build --release -q -p so8t-cli
MODEL="$(scripts/trained-smollm2.sh)"
PY=python3
LS="$CACHE/llama.cpp/build/bin/llama-server"
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD); $C clients, ${S}s, $P slots, max_tokens $N, 2 threads, $(basename "$MODEL")"

wait_up() { for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "server at $1 did not come up" >&2; return 1; }

./target/release/so8t -t 2 serve -m "$MODEL" --port 18181 --parallel "$P" --queue "$C" 2>/tmp/so8t-serve-bench.log &
PID=$!
wait_up http://127.0.0.1:18181
"$PY" bench/serve_load.py http://127.0.0.1:18181 "$PID" --clients "$C" --seconds "$S" --max-tokens "$N" --label "so8t serve --parallel $P"
kill "$PID"; wait "$PID" 2>/dev/null || true

"$LS" -m "$MODEL" --port 18182 -t 2 -np "$P" -c $((P * 2048)) --log-disable 2>/tmp/llama-server-bench.log &
PID=$!
wait_up http://127.0.0.1:18182
"$PY" bench/serve_load.py http://127.0.0.1:18182 "$PID" --clients "$C" --seconds "$S" --max-tokens "$N" --label "llama-server -np $P"
kill "$PID"; wait "$PID" 2>/dev/null || true
