#!/usr/bin/env bash
# Abuse soak of so8t serve (issue 18): a well-behaved client's p99 latency on the idle
# server and while abusive clients run beside it, in alternating rounds, and the
# server's RSS before and after. The trained SO8T SmolLM2-135M at Q8_0, 2 threads.
#
#   bench/abuse.sh [ROUNDS] [REQUESTS_PER_PHASE]
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-6}"; N="${2:-8}"
cargo build --release -q -p so8t-cli
MODEL="$(scripts/trained-smollm2.sh)"
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
ARGS=(--parallel 2 --max-connections 64 --max-connections-per-client 32 --read-timeout 2)
echo "# so8t $(git rev-parse --short HEAD); $(basename "$MODEL"); serve ${ARGS[*]}; $R rounds of $N requests per phase"
./target/release/so8t -t 2 serve -m "$MODEL" --port 18183 "${ARGS[@]}" 2>/tmp/so8t-abuse.log &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:18183/health >/dev/null 2>&1 && break; sleep 0.5; done
python3 bench/abuse_soak.py http://127.0.0.1:18183 "$PID" --rounds "$R" --requests "$N"
kill -0 "$PID" && echo "# the server is still running"
