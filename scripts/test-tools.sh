#!/usr/bin/env bash
# Fetches the real clients the server tests drive, from the package registries, into the
# cache ($SO8T_CACHE, default ~/.cache/so8t); prints what a test needs to run them.
#
#   scripts/test-tools.sh openai    # a venv with the official `openai` client; prints its python
#   scripts/test-tools.sh browser   # Debian chromium + playwright-core; prints "NODE_PATH CHROMIUM"
#   scripts/test-tools.sh torch     # a venv with torch, transformers, peft (so8t_torch's tests); prints its python
set -euo pipefail
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
mkdir -p "$CACHE"
OPENAI_VERSION=3.54.0
PLAYWRIGHT_VERSION=1.65.1

case "${1:-}" in
  openai)
    VENV="$CACHE/openai-venv"
    if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
      rm -rf "$VENV"
      python3 -m venv "$VENV" >&2
      "$VENV/bin/pip" install --quiet "openai==$OPENAI_VERSION" >&2
    fi
    echo "$VENV/bin/python"
    ;;
  torch)
    VENV="$CACHE/torch-venv"
    PKGS="torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6 accelerate==1.15.0"
    if ! "$VENV/bin/python" -c "import torch, transformers, safetensors, numpy, accelerate, sys; sys.exit(not (torch.__version__.startswith('2.15.0') and transformers.__version__ == '5.24.0'))" 2>/dev/null; then
      rm -rf "$VENV"
      python3 -m venv "$VENV" >&2
      "$VENV/bin/pip" install --quiet $PKGS >&2
    fi
    echo "$VENV/bin/python"
    ;;
  browser)
    if ! command -v chromium >/dev/null; then
      if [ "$(id -u)" = 0 ]; then
        (apt-get install -y --no-install-recommends chromium >&2 || { apt-get update >&2 && apt-get install -y --no-install-recommends chromium >&2; })
      else
        echo "chromium is not installed and this user cannot apt-get install it" >&2; exit 1
      fi
    fi
    DIR="$CACHE/playwright"
    if [ ! -f "$DIR/node_modules/playwright-core/package.json" ] ||
       [ "$(node -p "require('$DIR/node_modules/playwright-core/package.json').version")" != "$PLAYWRIGHT_VERSION" ]; then
      mkdir -p "$DIR"
      (cd "$DIR" && npm install --silent --no-audit --no-fund "playwright-core@$PLAYWRIGHT_VERSION" >&2)
    fi
    echo "$DIR/node_modules $(command -v chromium)"
    ;;
  *)
    echo "usage: $0 openai|browser|torch" >&2; exit 2 ;;
esac
