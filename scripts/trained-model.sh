#!/usr/bin/env bash
# Builds the best trained SO8T model this repository ships as a Q8_0 GGUF (heads and
# their settings in metadata), from a base fetched by scripts/fetch-models.sh and the
# adapter committed under eval/<model>/model, into the cache, and prints its path:
#
#   scripts/trained-model.sh [path/to/so8t]
#
# Which model is "best" is decided by the held-out-family evaluation in README
# ("Training results"); today it is the SmolLM2-135M heads (the same file as
# scripts/trained-smollm2.sh builds, which also checks it against llama.cpp's record).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec "$ROOT/scripts/trained-smollm2.sh" "$@"
