#!/usr/bin/env bash
# Load test: so8t serve and llama.cpp's llama-server on the same GGUF (the trained SO8T
# SmolLM2-135M at Q8_0), same slots, same threads, same closed-loop load, in alternating
# rounds (so8t, llama-server, so8t, …) so that the machine's drift hits both; prints each
# phase's JSON line, then the median ratio so8t ÷ llama-server over the rounds with its
# range. Needs scripts/build-llama-cpp.sh; fetches the rest.
#
#   bench/serve.sh [CLIENTS] [SECONDS] [PARALLEL] [MAX_TOKENS] [ROUNDS] [stream]
#
# With `stream` the answers are streamed and the time to first token (p50, p99) is
# compared too.
# With SO8T_BASELINE=path/to/an/older/so8t, each round also runs that binary (a change
# measured against the build before it, with llama-server as the yardstick).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
C="${1:-64}"; S="${2:-120}"; P="${3:-4}"; N="${4:-16}"; R="${5:-5}"
STREAM=(); [ "${6:-}" = stream ] && STREAM=(--stream)
cargo build --release -q -p so8t-cli
MODEL="$(scripts/trained-smollm2.sh)"
PY=python3
LS="$CACHE/llama.cpp/build/bin/llama-server"
OUT="$(mktemp)"
trap 'rm -f "$OUT"' EXIT
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# so8t $(git rev-parse --short HEAD); $C clients, ${S}s, $P slots, max_tokens $N, 2 threads, $R rounds, $(basename "$MODEL")${STREAM:+, streamed}"

wait_up() { for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "server at $1 did not come up" >&2; return 1; }

so8t_phase() { # BINARY LABEL
  "$1" -t 2 serve -m "$MODEL" --port 18181 --parallel "$P" --queue "$C" 2>/tmp/so8t-serve-bench.log &
  PID=$!
  wait_up http://127.0.0.1:18181
  "$PY" bench/serve_load.py http://127.0.0.1:18181 "$PID" --clients "$C" --seconds "$S" --max-tokens "$N" --label "$2" "${STREAM[@]}" | tee -a "$OUT"
  kill "$PID"; wait "$PID" 2>/dev/null || true
}

for r in $(seq 1 "$R"); do
  so8t_phase ./target/release/so8t "so8t serve --parallel $P"
  if [ -n "${SO8T_BASELINE:-}" ]; then so8t_phase "$SO8T_BASELINE" "baseline so8t serve --parallel $P"; fi

  "$LS" -m "$MODEL" --port 18182 -t 2 -np "$P" -c $((P * 2048)) --log-disable 2>/tmp/llama-server-bench.log &
  PID=$!
  wait_up http://127.0.0.1:18182
  "$PY" bench/serve_load.py http://127.0.0.1:18182 "$PID" --clients "$C" --seconds "$S" --max-tokens "$N" --label "llama-server -np $P" "${STREAM[@]}" | tee -a "$OUT"
  kill "$PID"; wait "$PID" 2>/dev/null || true
done

"$PY" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ours = [r for r in rows if r["label"].startswith("so8t")]
peers = {"llama-server": [r for r in rows if r["label"].startswith("llama")],
         "baseline so8t": [r for r in rows if r["label"].startswith("baseline")]}
for peer, theirs in peers.items():
    for key, what in [("generated_tokens_per_s", "generated tokens/s"), ("p50_s", "p50 latency"), ("p99_s", "p99 latency"),
                      ("ttft_p50_s", "p50 time to first token"), ("ttft_p99_s", "p99 time to first token")]:
        if not theirs or key not in theirs[0]:
            continue
        ratios = sorted(a[key] / b[key] for a, b in zip(ours, theirs))
        print(json.dumps({"ratio": f"so8t / {peer}", "of": what, "rounds": len(ratios),
                          "median": round(statistics.median(ratios), 3),
                          "min": round(ratios[0], 3), "max": round(ratios[-1], 3),
                          "so8t_median": round(statistics.median(a[key] for a in ours), 2),
                          "peer_median": round(statistics.median(b[key] for b in theirs), 2)}))
PY
