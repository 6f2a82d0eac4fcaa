#!/usr/bin/env bash
# Coverage-guided fuzzing of every target with cargo fuzz (libFuzzer), on stable Rust via
# RUSTC_BOOTSTRAP=1 (no nightly needed). Usage: scripts/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET…]
# Each target starts from fuzz/seeds/TARGET and fuzz/regressions/TARGET and grows
# fuzz/corpus/TARGET (not committed). A crash stops the run: its input is in
# fuzz/artifacts/TARGET/; copy it into fuzz/regressions/TARGET/ with the fix.
# Per input: 10 s and 2 GiB at most (a hang or an unbounded allocation is a finding).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gguf safetensors model_config so8t_config hf_tokenizer chat_template jsonl request image)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
(cd fuzz && cargo fuzz build -s none --release)
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/regressions/$t"
  echo "== $t: ${secs}s"
  (cd fuzz && cargo fuzz run -s none --release "$t" "corpus/$t" "seeds/$t" "regressions/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=262144 -print_final_stats=1 2>&1) \
    | grep -E "^(stat::|==|INFO: Running with|Done|#[0-9]+ *DONE)|SUMMARY|panicked|ERROR|Test unit written" || true
done
