"""Scoring samples: every program run in the sandbox (proven by its self-test first), then pass@k (Chen et al. 2021);
EvalPlus's benchmarks report it for the base and the plus tests, with what decided the plus verdicts (`plus_source`:
EvalPlus's release, or a Hub copy's merged test, which needs numpy in the sandbox and is not EvalPlus's score) and
how many samples were unscorable (their canonical solution could not run)."""
from __future__ import annotations

import functools
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
from ..hub import HUB_PREFIX
from ..infilling import COMPLETION
from ..sandbox import (INSTALL_HINT, SandboxLimits, SandboxUnavailable, detect_mechanism, run_program, sandbox_python,
                       self_test)
from .benchmarks import program_for, solution_for
from .evalplus import LIMITS as EVALPLUS_LIMITS
from .evalplus import UNSCORABLE, is_release_problem, score_plus

log = logging.getLogger(__name__)

PASS_DIGITS, SHOWN_DIGITS = 6, 4  # pass@k as written to pass_at_k.json, and as shown in the summary
PLUS_BENCHMARKS = ("humaneval-plus", "mbpp-plus")
# pass_at_k.json's `plus_source`: what decided the plus verdicts
RELEASE_SOURCE, HUB_SOURCE = "evalplus release", "hub merged test (not EvalPlus's comparison)"
# The Hub copies' merged tests (evalplus tools/*/to_original_fmt.py) start with `import numpy as np`
NUMPY_PROBE = "import numpy as np\n"
RELEASE_FILES = {"humaneval-plus": "HumanEvalPlus.jsonl.gz", "mbpp-plus": "MbppPlus.jsonl.gz"}
# Reported defects of the published Hub tests: the first fails every program, the others pass any that returns
HUB_DEFECTS = "HumanEval/32 (its test raises for every program), Mbpp/737, Mbpp/787, Mbpp/794 (their assertion " \
              "computes exact_match but never asserts it: any program that returns passes)"


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
    except SandboxUnavailable as e:
        if not h.allow_unsandboxed:
            raise SandboxUnavailable(f"{e}. Refusing to run model-written code unisolated; set "
                                     "humaneval.allow_unsandboxed=true to run it anyway (trusted models only)") from e
        log.warning("humaneval: %s; running generated code WITHOUT isolation (humaneval.allow_unsandboxed)", e)
        mechanism = "unsandboxed"
    if h.benchmark in PLUS_BENCHMARKS and h.problems.startswith(HUB_PREFIX):  # before any sampling
        check_hub_plus(mechanism, h.benchmark)
    return mechanism


@functools.cache
def check_hub_plus(mechanism: str, benchmark: str) -> None:
    """Once per process: the Hub copies' merged tests import numpy, so the sandbox's interpreter must have it (else
    every program fails and the score is a silent 0); and a warning that their score is not EvalPlus's."""
    marker = secrets.token_hex(16)
    r = run_program(NUMPY_PROBE + f"print({marker!r})\n", EVALPLUS_LIMITS, mechanism, marker)
    if not r.passed:
        why = " ".join(f"{r.status}: {r.detail}".split())  # one line, whatever the interpreter printed
        raise SandboxUnavailable(
            f"humaneval.benchmark={benchmark} from the Hub copy: its tests start with `import numpy as np`, which "
            f"fails in the sandbox ({why}), so every program would fail; install numpy for the "
            f"interpreter the sandbox runs ({sandbox_python()}), or give EvalPlus's release file "
            f"{RELEASE_FILES[benchmark]} as humaneval.problems (EvalPlus's own comparison, no numpy needed)")
    log.warning("humaneval: %s from the Hub copy: plus pass@k from its merged test, which is not EvalPlus's "
                "comparison (np.testing.assert_allclose, none of EvalPlus's special oracles) and not EvalPlus's "
                "score; known defective tasks: %s. EvalPlus's release file %s is the reference", benchmark,
                HUB_DEFECTS, RELEASE_FILES[benchmark])


def score_row(problem: dict[str, Any], row: dict[str, Any], limits: SandboxLimits, mechanism: str) -> dict[str, Any]:
    """One sample's results row: `passed` and `result` ("passed", "timed out", "failed: why"); an EvalPlus problem
    adds base_status, plus_status and base_passed, and `passed` is its plus verdict."""
    if "skipped" in row:  # never sampled: a fail, with the reason
        base = ("fail", False) if is_release_problem(problem) else (None, None)  # a Hub copy has no base set
        fails = {"base_status": base[0], "plus_status": "fail", "base_passed": base[1]} if is_plus(problem) else {}
        return {**row, **fails, "passed": False, "result": f"skipped: {row['skipped']}"}
    marker = secrets.token_hex(16)
    solution = solution_for(problem, row)
    if is_release_problem(problem):
        return {**row, **score_plus(problem, solution, mechanism, marker)}
    r = run_program(program_for(problem, solution, marker), limits, mechanism, marker)
    reason = r.status if r.status in ("passed", "timed out") else f"{r.status}: {r.detail}"
    if is_plus(problem):  # a Hub copy: one merged test of the base and plus inputs, so the plus verdict only
        status = "pass" if r.passed else "timeout" if r.status == "timed out" else "fail"
        return {**row, "base_status": None, "plus_status": status, "base_passed": None, "passed": r.passed,
                "result": reason}
    return {**row, "passed": r.passed, "result": reason}


def score_samples(problems: dict[str, dict], samples: list[dict[str, Any]], h: HumanEvalConfig,
                  mechanism: str) -> list[dict[str, Any]]:
    """Results rows of `samples` (each {task_id, completion or solution}) in their order, run `h.workers` at once."""
    limits = SandboxLimits(cpu_seconds=max(1, round(h.timeout)), wall_seconds=h.timeout,
                           memory_bytes=h.memory_mb << 20)
    # the Hub's EvalPlus tests run many inputs in one program: EvalPlus's limits, as for its release files
    plus_limits = EVALPLUS_LIMITS

    def score(row: dict[str, Any]) -> dict[str, Any]:
        problem = problems[row["task_id"]]
        return score_row(problem, row, plus_limits if is_plus(problem) else limits, mechanism)

    hub_plus = next((p for p in problems.values() if is_plus(p) and not is_release_problem(p)), None)
    if hub_plus is not None:  # a no-op after sandbox_mechanism's check, which callers run first
        check_hub_plus(mechanism, hub_plus["benchmark"])

    with ThreadPoolExecutor(h.workers or os.cpu_count() or 1) as pool:  # threads: each program is a process
        return list(tqdm(pool.map(score, samples), total=len(samples), desc=f"{h.benchmark}: running",
                         unit="program"))


def is_plus(problem: dict[str, Any]) -> bool:
    """Whether a problem is scored by EvalPlus's rules (base and plus)."""
    return problem.get("benchmark") in PLUS_BENCHMARKS


def plus_report(problems: dict[str, dict], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An EvalPlus report's `plus_source` and `unscorable` count, with a warning where samples were unscorable."""
    release = all(is_release_problem(problems[r["task_id"]]) for r in rows)
    unscorable = [r for r in rows if r["plus_status"] == UNSCORABLE]
    if unscorable:
        tasks = sorted({r["task_id"] for r in unscorable})
        log.warning("humaneval: %d of %d samples (%d problems: %s) are unscorable: the canonical solution failed in "
                    "the sandbox (a memory or wall limit under load?), so they were not checked and count as not "
                    "passed; pass@k is not trustworthy: score again with fewer humaneval.workers", len(unscorable),
                    len(rows), len(tasks), ", ".join(tasks[:10]) + (", ..." if len(tasks) > 10 else ""))
    return {"plus_source": RELEASE_SOURCE if release else HUB_SOURCE, "unscorable": len(unscorable)}


def pass_at_k_report(rows: list[dict[str, Any]], ks: Iterable[int]) -> dict[str, Any]:
    """pass@k as pass_at_k.json gives it: flat for a pass/fail benchmark; {"base": {...}, "plus": {...}} for EvalPlus
    (base null where the problems hold no base set: a Hub copy)."""
    def table(key: str) -> dict[str, float]:
        return {k: round(v, PASS_DIGITS) for k, v in pass_at_k_table(
            [{"task_id": r["task_id"], "passed": r[key]} for r in rows], ks).items()}

    if "plus_status" not in rows[0]:
        return table("passed")
    base = table("base_passed") if all(r["base_passed"] is not None for r in rows) else None
    return {"base": base, "plus": table("passed")}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON Lines through a temp file, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def shown(report: dict[str, Any]) -> dict[str, Any]:
    """A pass@k report as the summary shows it: pass@k to 4 decimals (the file keeps 6), EvalPlus's sets too."""
    return {k: round(v, SHOWN_DIGITS) if k.startswith("pass@") and isinstance(v, float) else
            shown(v) if k in ("base", "plus") and isinstance(v, dict) else v for k, v in report.items()}


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
    plus = "plus_status" in rows[0]
    summary = {"benchmark": h.benchmark, **pass_at_k_report(rows, h.ks),
               **(plus_report(problems, rows) if plus else {}),
               **({"not_reported": unreported} if unreported else {}), "task": h.task, "quality": h.quality,
               "problems": len({r["task_id"] for r in rows}), "samples": len(rows),
               "samples_per_problem": counts, "passed": sum(r["passed"] for r in rows),
               **({"base_passed": sum(bool(r["base_passed"]) for r in rows)} if plus else {}),
               "problems_skipped": len({r["task_id"] for r in rows if "skipped" in r}), "sandbox": mechanism,
               "isolated": mechanism != "unsandboxed", "scoring_seconds": round(seconds, 2),
               "programs_per_s": round(len(rows) / max(seconds, 1e-9), 1), **about}
    report.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s %s: %s over %d %s (sandbox %s)", h.benchmark, h.task, headline(summary), summary["problems"],
             "problems" if h.task == COMPLETION else "tasks", mechanism)
    return shown({**summary, "written": [str(results), str(report)]})


def headline(summary: dict[str, Any]) -> str:
    """pass@k of a report in one line: "pass@1 0.1234", or "base pass@1 0.2 / plus pass@1 0.1" for EvalPlus."""
    def line(table: dict[str, Any], prefix: str = "") -> str:
        return ", ".join(f"{prefix}{k} {v:.4f}" for k, v in table.items() if k.startswith("pass@"))

    if "plus" in summary:
        text = " / ".join(line(summary[s], f"{s} ") if summary[s] is not None else f"{s}: not reported"
                          for s in ("base", "plus"))
        return text + (f" ({summary['plus_source']})" if summary.get("plus_source") == HUB_SOURCE else "")
    return line(summary)
