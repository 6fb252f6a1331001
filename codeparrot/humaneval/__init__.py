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

`humaneval.benchmark` picks the benchmark: humaneval (the default, above), mbpp, humaneval-plus or mbpp-plus, each
with its reference harness's prompt, stop strings and checks (benchmarks.py; EvalPlus's output comparison in
evalplus.py, run in the sandbox by evalplus_harness.py). Their results go to humaneval/<benchmark>/step-N/.

Modules, by role: sources.py (problems from a file or the Hub), benchmarks.py (each benchmark's problems, prompt,
stop strings and checked program), problems.py (HumanEval's file, a run's tasks), sampling.py (work units, resumable
parts), scoring.py (sandbox, pass@k, the report), evalplus.py (EvalPlus's base and plus verdicts), run.py (the
command).

For a caller that scores one greedy completion per problem (e.g. during training):
    problems = load_benchmark(h)                    # list of problem dicts
    text = prompt_for(p); stops = stop_for(p, h)    # what to sample from, and where to cut
    rows = score_samples({p["task_id"]: p for p in problems}, [{"task_id": ..., "completion": ...}], h,
                         sandbox_mechanism(h))      # each row with `passed` (EvalPlus: the plus verdict)
    pass_at_k_report(rows, [1])                     # {"pass@1": ...} or {"base": {...}, "plus": {...}}
"""
from .benchmarks import BENCHMARKS, finish_for, load_benchmark, load_tasks, prompt_for, solution_for, stop_for
from .problems import load_problems
from .run import run_humaneval, run_humaneval_latest, run_humaneval_samples
from .scoring import pass_at_k_report, sandbox_mechanism, score_samples

__all__ = ["BENCHMARKS", "finish_for", "load_benchmark", "load_problems", "load_tasks", "pass_at_k_report",
           "prompt_for", "run_humaneval", "run_humaneval_latest", "run_humaneval_samples", "sandbox_mechanism",
           "score_samples", "solution_for", "stop_for"]
