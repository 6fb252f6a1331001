#!/usr/bin/env bash
# From a fresh clone to a trained tiny code model on this machine's own Python files:
# export-local -> prepare (and once more on a small Parquet export) -> train-tokenizer -> pretokenize -> sft-data
# -> train (pass@1 on 5 HumanEval problems at each evaluation) -> evaluate -> humaneval (3 problems)
# -> sft (instruction tuning on docstring records), then
# `generate` samples from the trained model, left to right conditioned on the high quality bucket, then fills in
# the middle of a function (the demo trains with quality tokens and fill-in-the-middle), and the fine-tuned model
# answers an instruction in its prompt format. A second run skips finished
# stages.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.max_steps=50`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
start=$(date +%s)
# greedy pass@1 on 5 HumanEval problems at every evaluation (eval.code_benchmark): loss.png's second panel
codeparrot pipeline --config configs/tiny.yaml eval.code_benchmark=humaneval eval.code_benchmark_limit=5 "$@"
# The Parquet path of prepare (The Stack's, github-code's, BigQuery's Parquet exports), on a capped Parquet export
codeparrot export-local work/tiny/raw-parquet --format parquet --max-files 300
codeparrot prepare --config configs/tiny.yaml "$@" paths.raw=work/tiny/raw-parquet paths.clean=work/tiny/clean-parquet \
  corpus.source=path
codeparrot generate --config configs/tiny.yaml "$@" --prompt "def fibonacci(n):" --max-new-tokens 48 --temperature 0.2 \
  --quality high
codeparrot generate --config configs/tiny.yaml "$@" --prefix $'def add(a, b):\n    c = ' --suffix $'\n    return c\n' \
  --max-new-tokens 16 --temperature 0 --stop '\n'
codeparrot generate --config configs/tiny.yaml "$@" --instruction "Return the sum of two numbers." --max-new-tokens 32
echo "demo: finished in $(( $(date +%s) - start )) s; artifacts under work/tiny/ (TensorBoard: tensorboard --logdir work/tiny/runs)"
