#!/usr/bin/env bash
# Export time and peak RSS: so8t export vs llama.cpp's convert_hf_to_gguf.py + llama-quantize,
# on the same f16 HF directory of Qwen2.5-Coder-0.5B, to Q8_0 and Q4_K_M, in one run.
# The directory is made here: the GGUF dequantised by `so8t convert`, baked to f16.
# Needs scripts/fetch-models.sh, scripts/build-llama-cpp.sh and the reference venv
# (PYTHON, default ~/.cache/so8t/pyref/bin/python, with torch, transformers, gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
PY="${PYTHON:-$CACHE/pyref/bin/python}"
L="$CACHE/llama.cpp"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
cargo build --release -q -p so8t-cli
S=./target/release/so8t
$S convert "$CACHE/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" --out "$W/so8t" 2>/dev/null
$S bake "$W/so8t" --out "$W/qwen-f16" --dtype f16 2>/dev/null
rm -rf "$W/so8t"
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; input: f16 HF directory of Qwen2.5-Coder-0.5B ($(du -sh "$W/qwen-f16" | cut -f1))"
# seconds and peak RSS (MiB) of one command
run() { /usr/bin/time -f "%e %M" -o "$W/t" "$@" >/dev/null 2>&1; read -r s k < "$W/t"; echo "$s $((k / 1024))"; }
# llama.cpp's converter checks the tokenizer by hash; this one was rebuilt from GGUF
# metadata with llama.cpp's own qwen2 regex, so tell it the name (no effect on timing).
conv=(-c "import sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '$L/gguf-py'); sys.path.insert(0, '$L'); import convert_hf_to_gguf as c, conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'; c.main()")
echo
echo "| target | tool | seconds | peak RSS MiB |"
echo "| --- | --- | ---: | ---: |"
for q in q8_0 q4_k_m; do
  read -r s m < <(run $S export "$W/qwen-f16" --out "$W/so8t-$q.gguf" --quant $q)
  echo "| $q | so8t export | $s | $m |"
  read -r s1 m1 < <(run "$PY" "${conv[@]}" convert_hf_to_gguf.py "$W/qwen-f16" --outtype f16 --outfile "$W/f16.gguf")
  Q=$(echo $q | tr a-z A-Z)
  read -r s2 m2 < <(run "$L/build/bin/llama-quantize" "$W/f16.gguf" "$W/llama-$q.gguf" "$Q")
  echo "| $q | convert_hf_to_gguf.py (f16) + llama-quantize | $(echo "$s1 + $s2" | bc) ($s1 + $s2) | $((m1 > m2 ? m1 : m2)) |"
  rm -f "$W/f16.gguf"
done
