#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: create .venv if missing, install once, reinstall only when
# pyproject.toml changes. Sourced, so the caller gets VENV and PY.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$PY" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# torch first, pinned to the CPU wheel this machine carries; any torch>=2.4 already present is kept.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
STAMP="$VENV/.codeparrot-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing codeparrot and its dependencies into $VENV"
  "$PY" -m pip install -q -e "$ROOT[dev]"
  echo "$WANT" > "$STAMP"
fi
# bubblewrap isolates model-written code (humaneval, the sandbox); installed where this user can, else said once
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing bubblewrap (the sandbox for generated code)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } >/dev/null 2>&1 || \
      echo "setup: could not install bubblewrap; humaneval refuses to run generated code until it is installed"
  else
    echo "setup: bubblewrap (bwrap) is missing; humaneval needs it: sudo apt-get install bubblewrap (or dnf, pacman)"
  fi
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
