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
WANT="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$ROOT/fixtures/llama-cpp/trained-smollm2.json")"
exec "$ROOT/scripts/trained-gguf.sh" smollm2 SmolLM2-135M-Instruct.Q4_1.gguf smollm2-135m so8t "$WANT" \
  so8t-smollm2-135m-trained-q8_0.gguf "$@"
