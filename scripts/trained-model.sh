#!/usr/bin/env bash
# Builds the best trained SO8T model this repository ships as a Q8_0 GGUF (heads and
# their settings in metadata), from a base fetched by scripts/fetch-models.sh and the
# adapter committed under eval/<model>/model, into the cache, and prints its path:
#
#   scripts/trained-model.sh [path/to/so8t]
#
# Which model is "best" is decided by the held-out-family evaluation in README
# ("Training results"); today it is the Qwen2.5-Coder-0.5B-Instruct heads
# (eval/qwen2.5-coder-0.5b/model). The export is deterministic: the same base and adapter
# give the same bytes, checked against the sha256 of the file that was scored.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# The sha256 of the file eval/ scored (scripts/train-eval.sh qwen25coder).
WANT=2551d4c1a2629dbe2bc8644c1874c9df0097404489655e8604d20f1b7c530800
exec "$ROOT/scripts/trained-gguf.sh" qwen25coder qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen2.5-coder-0.5b \
  qwen2.5-coder-0.5b-heads "$WANT" so8t-qwen2.5-coder-0.5b-trained-q8_0.gguf "$@"
