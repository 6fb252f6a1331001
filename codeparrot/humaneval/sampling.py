"""Sampling HumanEval completions as resumable work units: (task, batch of samples), each from its own seeded stream.

Under `accelerate launch` each process takes every world-size-th unit and appends its finished units to
`parts/rank-<r>.jsonl`; a rerun skips the units found there (resume), so the samples never depend on how many
processes share them. The main process merges the parts in problem and sample order.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import Config, HumanEvalConfig
from ..infilling import COMPLETION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """A batch of samples of one problem: samples first .. first+count-1, drawn from their own seeded stream."""

    task_id: str
    first: int
    count: int

    def seed(self, seed: int) -> int:
        """The unit's sampling seed: set by the run's seed, the problem and the batch, never by the process count."""
        digest = hashlib.sha256(f"{seed}/{self.task_id}/{self.first}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


def work_units(problems: list[dict[str, Any]], n: int, batch_size: int) -> list[Unit]:
    """Every problem's n samples, cut into batches of at most batch_size."""
    size = max(1, batch_size)
    return [Unit(p["task_id"], first, min(size, n - first)) for p in problems for first in range(0, n, size)]


def read_parts(parts: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished units in parts/*.jsonl: (task_id, first) -> its row; a line cut off by a crash is dropped."""
    done = {}
    for file in sorted(parts.glob("rank-*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                if not isinstance(row["completions"], list):
                    raise TypeError("completions is not a list")
                done[row["task_id"], row["first"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("humaneval: ignoring a damaged line in %s (a crash cut it off); its unit is redone", file)
    return done


def drop_cut_line(file: Path) -> None:
    """Truncate a part file back to its last complete line, before a rerun appends to it.

    A crash can leave the last line without its newline; appended after it, the next unit would share its line
    and be dropped with it by read_parts, and the merge would find that unit missing."""
    if not file.is_file():
        return
    with open(file, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def task_prompt(tokenizer, task: dict[str, Any], h: HumanEvalConfig, eos_id: int | None) -> list[int]:
    """A task's prompt ids: EOS, then its benchmark reference's prompt (benchmarks.prompt_for), or an infill's PSM
    prompt (prefix kept whole: it ends where the middle starts); quality token first."""
    from ..generate import Infill, prompt_ids
    from .benchmarks import prompt_for

    prompt = Infill(task["prompt"], task["suffix"]) if "suffix" in task else prompt_for(task)
    return prompt_ids(tokenizer, prompt, eos_id, h.quality)


def task_stop(h: HumanEvalConfig, task: dict[str, Any]) -> tuple[str, ...]:
    """Where a sample ends besides EOS. A benchmark's are its reference's stop strings (humaneval's: humaneval.stop);
    an infill's middle ends at EOS as trained, and a single-line one at its first newline (its middle is one line,
    and a small model rarely emits EOS soon enough)."""
    from .benchmarks import stop_for

    if h.task == COMPLETION:
        return stop_for(task, h)
    return ("\n",) if h.task == "infill-single-line" else ()


def finish_text(h: HumanEvalConfig, text: str) -> str:
    """The completion as scored: a single-line middle gets back the newline its stop string cut off; EvalPlus's
    decoder turns tabs into spaces."""
    from .benchmarks import finish_for

    return text + "\n" if h.task == "infill-single-line" else finish_for(h.benchmark, text)


def generate_samples(cfg: Config, checkpoint: Path, units: list[Unit], problems: dict[str, dict], parts: Path,
                     accelerator) -> None:
    """Sample this process's share of the units not yet in parts/, appending each finished unit at once."""
    from ..generate import load_checkpoint
    from ..sampler import SamplingConfig, sample

    h = cfg.humaneval
    done = read_parts(parts)
    # every process must split the same todo list: none appends a unit before all have read the parts
    accelerator.wait_for_everyone()
    todo = [u for u in units if (u.task_id, u.first) not in done]
    mine = todo[accelerator.process_index::accelerator.num_processes]
    log.info("humaneval: %d of %d sample batches done before; this process samples %d", len(units) - len(todo),
             len(units), len(mine))
    if not mine:
        return
    model, tokenizer = load_checkpoint(checkpoint, accelerator.device)
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
    file = parts / f"rank-{accelerator.process_index}.jsonl"
    drop_cut_line(file)
    with open(file, "a", encoding="utf-8") as out:
        for unit in tqdm(mine, desc="humaneval: sampling", unit="batch", disable=not accelerator.is_local_main_process):
            prompt = task_prompt(tokenizer, problems[unit.task_id], h, eos_id)
            row = {"task_id": unit.task_id, "first": unit.first, "completions": [""] * unit.count}
            room = model.config.n_positions - len(prompt)  # a prompt is never cropped: it would be another problem
            if room < 1:
                row["skipped"] = f"prompt of {len(prompt)} tokens fills the context ({model.config.n_positions})"
            else:  # the generation gets what room is left, up to max_new_tokens
                sampling = SamplingConfig(unit.count, min(h.max_new_tokens, room), h.temperature, h.top_k, h.top_p,
                                          eos_id, task_stop(h, problems[unit.task_id]), unit.seed(h.seed))
                with accelerator.autocast():
                    row["completions"] = [finish_text(h, c.text) for c in sample(model, [prompt], sampling, decode)[0]]
            out.write(json.dumps(row) + "\n")
            out.flush()


def merge_samples(units: list[Unit], parts: Path) -> list[dict[str, Any]]:
    """samples.jsonl rows (task_id, completion) in problem and sample order, from every process's parts."""
    done = read_parts(parts)
    missing = [u for u in units if (u.task_id, u.first) not in done]
    if missing:
        raise RuntimeError(f"humaneval: {len(missing)} sample batches are missing from {parts} after sampling")
    rows = []
    for u in units:
        part = done[u.task_id, u.first]
        skipped = {"skipped": part["skipped"]} if "skipped" in part else {}
        rows += [{"task_id": u.task_id, "completion": text, **skipped} for text in part["completions"]]
    return rows
