#!/usr/bin/env bash
# Abuse soak (issue 18): a well-behaved client's p99 latency on an idle server and
# while abusive clients run beside it (bench/abuse_soak.py), in alternating rounds, and
# the server's RSS before and after. The trained SO8T SmolLM2-135M at Q8_0, 2 threads,
# three servers in one run: so8t serve with a per-address connection cap, so8t serve
# without one, and llama.cpp's llama-server (needs scripts/build-llama-cpp.sh).
#
#   bench/abuse.sh [ROUNDS] [REQUESTS_PER_PHASE]
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-6}"; N="${2:-8}"
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
cargo build --release -q -p so8t-cli
MODEL="$(scripts/trained-smollm2.sh)"
LS="$CACHE/llama.cpp/build/bin/llama-server"
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD); $(basename "$MODEL"); $R rounds of $N requests per phase"

soak() { # LABEL PORT COMMAND...
  local label=$1 port=$2; shift 2
  "$@" 2>/tmp/abuse-server.log &
  local pid=$!
  for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.5; done
  python3 bench/abuse_soak.py "http://127.0.0.1:$port" "$pid" --rounds "$R" --requests "$N" --label "$label"
  if kill -0 "$pid" 2>/dev/null; then echo "# $label: still running"; else echo "# $label: DIED"; fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}
CAPS=(--parallel 2 --max-connections 64 --read-timeout 2)
soak "so8t serve, 32 connections per address" 18183 \
  ./target/release/so8t -t 2 serve -m "$MODEL" --port 18183 "${CAPS[@]}" --max-connections-per-client 32
soak "so8t serve, no per-address cap" 18184 \
  ./target/release/so8t -t 2 serve -m "$MODEL" --port 18184 "${CAPS[@]}"
soak "llama-server -np 2" 18185 \
  "$LS" -m "$MODEL" --port 18185 -t 2 -np 2 -c 4096 --metrics --log-disable
