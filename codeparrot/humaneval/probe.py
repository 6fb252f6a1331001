"""pass@1 during training (`eval.code_benchmark`): at each evaluation, one greedy completion of each of a benchmark's
first problems, scored in the sandbox, the problems shared among the processes.

Perplexity and pass@k part ways, and the loss alone does not say when a run has stopped getting better at code. The
prompts, stop strings and tests are the `humaneval` command's (benchmarks.py), with n=1 at temperature 0, so that a
number logged at step N is what `codeparrot humaneval` gives that checkpoint greedily on the same problems with the
same max_new_tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError, HumanEvalConfig

log = logging.getLogger(__name__)


def probe_settings(cfg: Config) -> HumanEvalConfig:
    """The humaneval keys of the probe: the benchmark, its problems and limit from eval.code_benchmark*, greedy."""
    e, h = cfg.eval, cfg.humaneval
    # humaneval.problems names the problems of humaneval.benchmark; another benchmark's default is its own
    problems = e.code_benchmark_problems or (h.problems if h.benchmark == e.code_benchmark else "")
    return dataclasses.replace(h, benchmark=e.code_benchmark, problems=problems, limit=e.code_benchmark_limit,
                               n=1, temperature=0.0, top_k=0, top_p=1.0, task="completion",
                               max_new_tokens=e.code_benchmark_max_new_tokens, ks=[1])


class CodeBenchmarkProbe:
    """Greedy pass@1 of the model being trained on eval.code_benchmark, every process scoring its share."""

    def __init__(self, cfg: Config, tokenizer, accelerator, run: Path) -> None:
        from accelerate.utils import DistributedType

        from .benchmarks import load_benchmark
        from .evalplus import is_release_problem
        from .sampling import task_prompt
        from .scoring import sandbox_mechanism

        if accelerator.distributed_type == DistributedType.FSDP:  # ranks would decode different lengths: a hang
            raise ConfigError("eval.code_benchmark does not run under FSDP (each process would decode its own "
                              "problems on a sharded model); set eval.code_benchmark=\"\" and score checkpoints "
                              "with `codeparrot humaneval`")
        self.h, self.acc = probe_settings(cfg), accelerator
        self.name = f"{self.h.benchmark}_pass@1"
        problems = load_benchmark(self.h, cfg.hub)
        self.n_problems, self.task_ids = len(problems), [p["task_id"] for p in problems]
        self.out = run / "code_benchmark" / self.h.benchmark
        self.has_base = is_release_problem(problems[0])  # EvalPlus's release files; the Hub's copies have no base
        # before step 0: a machine that cannot score stops now, not at the first evaluation hours later
        self.mechanism = sandbox_mechanism(self.h)
        self.eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
        self.decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
        self.mine = problems[accelerator.process_index::accelerator.num_processes]
        self.prompts = [task_prompt(tokenizer, p, self.h, self.eos_id) for p in self.mine]
        # the processes of one machine share its cores for the sandboxed programs
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.h = dataclasses.replace(self.h, workers=self.h.workers or max(1, (os.cpu_count() or 1) // local))
        log.info("train: %s on %d problems at each evaluation (%d on this process), sandbox %s", self.name,
                 self.n_problems, len(self.mine), self.mechanism)

    def completions(self, model) -> list[dict[str, Any]]:
        """This process's samples rows: one greedy completion per problem (skipped when its prompt fills the
        context, a fail as in `humaneval`)."""
        from ..sampler import SamplingConfig, sample
        from .sampling import finish_text, task_stop

        gpt = self.acc.unwrap_model(model)
        rows = []
        for problem, prompt in zip(self.mine, self.prompts):
            room = gpt.config.n_positions - len(prompt)
            if room < 1:
                rows.append({"task_id": problem["task_id"], "completion": "",
                             "skipped": f"prompt of {len(prompt)} tokens fills the context"})
                continue
            sampling = SamplingConfig(1, min(self.h.max_new_tokens, room), 0.0, 0, 1.0, self.eos_id,
                                      task_stop(self.h, problem))
            text = sample(gpt, [prompt], sampling, self.decode)[0][0].text
            rows.append({"task_id": problem["task_id"], "completion": finish_text(self.h, text)})
        return rows

    def __call__(self, model, step: int) -> dict[str, float]:
        """{"<benchmark>_pass@1": passed / problems} over every process (EvalPlus's: the plus verdict, and the base
        one as <benchmark>_base_pass@1); the results rows go to <run>/code_benchmark/<benchmark>/step-<step>.jsonl."""
        from accelerate.utils import gather_object

        from .scoring import score_samples, write_jsonl

        model.eval()
        # compiled blocks would recompile for every decode length: decode eagerly, the same math
        with torch.no_grad(), self.acc.autocast(), torch.compiler.set_stance("force_eager"):
            rows = self.completions(model)
        results = score_samples({p["task_id"]: p for p in self.mine}, rows, self.h, self.mechanism) if rows else []
        every = gather_object(results) if self.acc.num_processes > 1 else results
        if self.acc.is_main_process:  # in problem order, as `humaneval` writes its results
            order = {task_id: i for i, task_id in enumerate(self.task_ids)}
            self.out.mkdir(parents=True, exist_ok=True)
            write_jsonl(self.out / f"step-{step}.jsonl", sorted(every, key=lambda r: order[r["task_id"]]))
        counts = [sum(bool(r["passed"]) for r in results), sum(bool(r.get("base_passed")) for r in results)]
        total = self.acc.reduce(torch.tensor(counts, device=self.acc.device, dtype=torch.float64), reduction="sum")
        out = {self.name: total[0].item() / self.n_problems}
        if self.has_base:
            out[f"{self.h.benchmark}_base_pass@1"] = total[1].item() / self.n_problems
        return out
