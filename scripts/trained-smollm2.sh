#!/usr/bin/env bash
# Builds the trained SO8T SmolLM2-135M as a Q8_0 GGUF (heads in metadata) from the
# fetched base and the adapter committed in eval/smollm2-135m/model, into the cache:
#
#   scripts/trained-smollm2.sh [path/to/so8t]   # prints the GGUF's path
#
# The file is the one llama.cpp's recorded run used (fixtures/llama-cpp/trained-smollm2.json
# holds its sha256), so llama-server and `so8t serve` can be compared on it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SO8T="${1:-$ROOT/target/release/so8t}"
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
OUT="$CACHE/so8t-smollm2-135m-trained-q8_0.gguf"
WANT="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$ROOT/fixtures/llama-cpp/trained-smollm2.json")"
if [ -f "$OUT" ] && [ "$(sha256sum "$OUT" | cut -d' ' -f1)" = "$WANT" ]; then echo "$OUT"; exit 0; fi
"$ROOT/scripts/fetch-models.sh" smollm2 >&2
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$SO8T" convert "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$TMP/so8t" >&2
cp "$ROOT"/eval/smollm2-135m/model/* "$TMP/so8t/"
"$SO8T" export "$TMP/so8t" --out "$TMP/m.gguf" --quant q8_0 >&2
GOT="$(sha256sum "$TMP/m.gguf" | cut -d' ' -f1)"
[ "$GOT" = "$WANT" ] || { echo "trained-smollm2: export sha256 $GOT, expected $WANT" >&2; exit 1; }
mv "$TMP/m.gguf" "$OUT"
echo "$OUT"
