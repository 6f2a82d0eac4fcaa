#!/usr/bin/env bash
# Issue #20's GPU checks, in one run on a GPU machine (no Rust there, no network). What
# bench/cuda-prepare.sh packed under .dev/1..3 is first copied to $DEV by one device call
# each (`mkdir -p $DEV && cp .dev/N/* $DEV/`, a call carrying .dev/N), then this runs.
# Writes to $OUT: gpu.txt, cuda-tests.log, cuda-report.jsonl (every measured difference),
# bench.jsonl (so8t and transformers in alternating rounds), bench.log, run.json.
#   bash bench/cuda.sh [ROUNDS]    (0: the tests alone)
#   bash bench/cuda.sh 0 serve     (`serve --device cuda` alone: bench/cuda_serve.py)
set -uo pipefail
ROUNDS="${1:-5}"
OUT="${OUT:-/tmp/so8t-cuda}"; mkdir -p "$OUT"
DEV="${DEV:-/root/so8t-dev}"
here="$(cd "$(dirname "$0")/.." && pwd)"
for b in so8t cuda-tests; do
  [ -x "$DEV/$b" ] || { python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' "$DEV/$b.xz" "$DEV/$b" && chmod +x "$DEV/$b"; }
done
# CUDA 13's libraries come with the machine's PyTorch (pip's nvidia-* wheels); the
# driver's libcuda is on the loader's path already.
nv="$(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null || true)"
libs="$(find $nv -name 'lib*.so.*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)"
export LD_LIBRARY_PATH="$libs:/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

models="${MODELS:-/root/so8t-models}"; mkdir -p "$models"
[ -s "$models/smollm2-q4_0.gguf" ] || cat "$DEV"/smollm2.q4_0.part* >"$models/smollm2-q4_0.gguf"
so8t="$DEV/so8t"
# SmolLM2's real weights in f32 (an SO8T directory: random gates, and heads), and a
# Qwen2.5-0.5B-shaped bf16 checkpoint with random weights.
[ -d "$models/smollm2-so8t" ] || "$so8t" convert "$models/smollm2-q4_0.gguf" --out "$models/smollm2-so8t" --init random --seed 3 >"$OUT/convert.log" 2>&1 || cat "$OUT/convert.log"
if [ "${2:-}" = serve ]; then
  # `serve --device cuda`: requests one by one, then all at once (bench/cuda_serve.py).
  python3 "$here/bench/cuda_serve.py" "$so8t" "$models/smollm2-so8t" 4 2>"$OUT/serve.log" | tee "$OUT/serve.json"
  exit
fi
q="$models/qwen2.5-0.5b-random"
[ -d "$q" ] || python3 "$here/bench/cuda_peer.py" make "$q" >"$OUT/make.log" 2>&1 || tail -5 "$OUT/make.log"

export SO8T_FIXTURES="$here/fixtures"
export SO8T_CUDA_MODELS="$models/smollm2-q4_0.gguf:$models/smollm2-so8t:$q"
export SO8T_CUDA_REPORT="$OUT/cuda-report.jsonl"; rm -f "$SO8T_CUDA_REPORT"
timeout 300 "$DEV/cuda-tests" --test-threads 1 --nocapture >"$OUT/cuda-tests.log" 2>&1
echo "cuda tests: exit $?" | tee -a "$OUT/cuda-tests.log"
grep -E '^test |test result|panicked' "$OUT/cuda-tests.log"

# Speeds: so8t and transformers on the same bf16 checkpoint, alternating; so8t alone on
# SmolLM2 Q4_0 and f32 (no llama.cpp CUDA build is possible there: no network, and one
# takes longer than the lease).
[ "$ROUNDS" -gt 0 ] || exit 0
rm -f "$OUT/bench.jsonl"
timeout 300 python3 "$here/bench/cuda_peer.py" bench "$q" 512 128 "$ROUNDS" "$so8t" 2>>"$OUT/bench.log" >>"$OUT/bench.jsonl"
for m in smollm2-q4_0.gguf smollm2-so8t; do
  "$so8t" bench -m "$models/$m" --device cuda -p 512 -n 128 -r 3 --no-probe 2>>"$OUT/bench.log" | tee -a "$OUT/bench.log" | grep -E '^\| [a-z]'
done
"$so8t" run -m "$models/smollm2-q4_0.gguf" --device cuda -p "What is the capital of France?" -n 24 --temperature 0 --json >"$OUT/run.json" 2>>"$OUT/bench.log"
cat "$OUT/bench.jsonl"
head -c 600 "$OUT/run.json"; echo
