#!/usr/bin/env bash
# Builds a trained SO8T model as a Q8_0 GGUF (heads in metadata) into the cache, from a
# base fetched by scripts/fetch-models.sh and the adapter committed in eval/MODEL/model,
# checks the file's sha256 and prints its path. trained-smollm2.sh and trained-model.sh
# name the models they ship with it:
#
#   scripts/trained-gguf.sh FETCH BASE.gguf MODEL DIR SHA256 OUT.gguf [path/to/so8t]
#
# DIR is the name of the SO8T directory exported, which becomes the file's general.name
# (so it is part of what the sha256 checks).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
fetch=$1 base=$2 model=$3 dir=$4 want=$5 name=$6
SO8T="${7:-$ROOT/target/release/so8t}"
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
OUT="$CACHE/$name"
if [ -f "$OUT" ] && [ "$(sha256sum "$OUT" | cut -d' ' -f1)" = "$want" ]; then echo "$OUT"; exit 0; fi
"$ROOT/scripts/fetch-models.sh" "$fetch" >&2
TMP="$(mktemp -d "$CACHE/.trained-gguf.XXXXXX")"  # same file system: the final mv is a rename
trap 'rm -rf "$TMP"' EXIT
"$SO8T" convert "$CACHE/$base" --out "$TMP/$dir" >&2
cp "$ROOT/eval/$model/model/"* "$TMP/$dir/"
"$SO8T" export "$TMP/$dir" --out "$TMP/m.gguf" --quant q8_0 >&2
GOT="$(sha256sum "$TMP/m.gguf" | cut -d' ' -f1)"
[ "$GOT" = "$want" ] || { echo "$name: export sha256 $GOT, expected $want" >&2; exit 1; }
mv "$TMP/m.gguf" "$OUT"
echo "$OUT"
