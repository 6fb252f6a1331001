#!/usr/bin/env bash
# One-shot GPU check: the gpu test tier, training tokens/s and MFU (codeparrot-small against transformers, and the
# 1.5B model), sampling tokens/s against transformers' generate, and HumanEval's wall time, into one JSON file.
#   bash scripts/gpu_check.sh                  # on a CUDA machine, < 9 minutes: work/gpu_check.json
#   bash scripts/gpu_check.sh --dry-run        # the same steps on the CPU with tiny shapes: work/gpu_check-dry.json
#   bash scripts/gpu_check.sh --out PATH [--workdir DIR] [--steps NAME ...] [--allow-unsandboxed]
# The interpreter: $PY if set, else the project's .venv (set up by setup_env.sh), else python3 (a GPU image's,
# whose torch has CUDA: setup_env.sh would install a CPU torch into a new .venv). See scripts/gpu_check.py.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PY:-}" ]; then
  if [ -x "$HERE/../.venv/bin/python" ]; then
    source "$HERE/setup_env.sh" >&2
  else
    PY="$(command -v python3)"
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
exec "$PY" "$HERE/gpu_check.py" "$@"
