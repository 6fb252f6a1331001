"""The `humaneval` command: sample completions of HumanEval problems, run them sandboxed, report pass@k.

`humaneval.task` picks the tasks: `completion` is HumanEval as published; `infill-single-line` and
`infill-multi-line` are the infilling tasks derived from the same problems (infilling.py), where the model writes the
middle between a prefix and a suffix in the PSM form training used, and the program checked is prefix + middle +
suffix + tests. `humaneval.quality` puts a quality bucket's token in front of every prompt.

The work is (task, batch of samples) units, each sampled from its own seeded stream, so the samples do not depend
on how many processes share them. Under `accelerate launch` each process takes every world-size-th unit and appends
its finished units to `parts/rank-<r>.jsonl`; a rerun skips the units found there (resume). The main process merges
the parts into `samples.jsonl`, runs every program in the sandbox and writes `results.jsonl` and `pass_at_k.json`.

Results record the fingerprint of the checkpoint's weights (checkpoint_fingerprint), so that a checkpoint retrained
under the same `step-N` name is scored again instead of skipped; `evaluate` keys its results the same way.

Modules, by role: problems.py (the problems and tasks), sampling.py (work units, resumable parts), scoring.py
(sandbox, pass@k, the report), run.py (the command).
"""
from .problems import load_problems, load_tasks
from .run import run_humaneval, run_humaneval_latest, run_humaneval_samples

__all__ = ["load_problems", "load_tasks", "run_humaneval", "run_humaneval_latest", "run_humaneval_samples"]
