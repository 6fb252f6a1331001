"""EvalPlus's scoring of HumanEval+ and MBPP+ from its release files: the candidate's outputs against the canonical
solution's on the base inputs and on the plus inputs, each sample one sandboxed program (evalplus_harness.py, the
problem's data and the candidate as a JSON payload). Nothing of the candidate or the canonical solution runs here.

EvalPlus (evaluate.py) reports `base` (the base inputs pass) and `plus` (the base AND the plus inputs pass); a results
row keeps both statuses in EvalPlus's words (pass, fail, timeout), and `passed` is the plus verdict. A sample whose
canonical solution could not run here (a memory or wall limit under load) is `unscorable`: not checked, counted as
not passed, and counted apart in the report (scoring.py) so that a score it lowers is not taken for the model's.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ..sandbox import Result, SandboxLimits, run_program

HARNESS = Path(__file__).with_name("evalplus_harness.py")
REFERENCE_SECONDS = 60  # the canonical solution's run on both sets, before the candidate's (a few seconds at most)
SET_SECONDS = 61  # the harness's per-set limit at most: min(60 s, the inputs' limits) + 1
# EvalPlus's limits, not humaneval.timeout / memory_mb: its sets take up to a minute by its rules, and it allows
# 4 GiB (EVALPLUS_MAX_MEMORY_BYTES); the wall limit only stops a candidate that defeats the harness's own timers.
SECONDS = REFERENCE_SECONDS + 2 * SET_SECONDS
LIMITS = SandboxLimits(cpu_seconds=SECONDS, wall_seconds=SECONDS, memory_bytes=4 << 30)
PASS = "pass"
UNSCORABLE = "unscorable"  # the canonical solution failed: the candidate was not checked


@functools.cache
def harness_source() -> str:
    """The sandbox-side harness, read once."""
    return HARNESS.read_text(encoding="utf-8")


def is_release_problem(problem: dict[str, Any]) -> bool:
    """Whether a problem carries EvalPlus's base and plus inputs (a release file), not a merged `test` (the Hub)."""
    return "base_input" in problem and "plus_input" in problem


def plus_program(problem: dict[str, Any], solution: str, marker: str) -> str:
    """The harness, then one call with this problem's inputs, its reference code and the candidate's."""
    payload = {"dataset": "mbpp" if problem["task_id"].startswith("Mbpp/") else "humaneval",
               "task_id": problem["task_id"], "entry_point": problem["entry_point"], "atol": problem["atol"],
               "base_input": problem["base_input"], "plus_input": problem["plus_input"],
               # get_groundtruth runs prompt + canonical_solution (an MBPP+ prompt is a docstring)
               "reference": problem["prompt"] + problem["canonical_solution"], "solution": solution,
               "marker": marker}
    return f"{harness_source()}\n\nmain({json.dumps(payload)!r})\n"


def statuses(result: Result, marker: str) -> dict[str, str]:
    """{"reference"|"base"|"plus": status} from the lines only this run's harness could print (they hold the marker)."""
    found = {}
    for line in result.stdout.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == marker:
            found[parts[1]] = parts[2]
    return found


def verdict(result: Result, marker: str) -> dict[str, Any]:
    """A results row's verdict fields: base_status, plus_status, base_passed, passed (= plus) and result (why)."""
    found = statuses(result, marker)
    if "reference" not in found:  # the canonical solution did not run (a limit under load): nothing to compare with
        why = (f"{UNSCORABLE}: the reference solution failed ({result.status}: {result.detail}); the candidate was "
               "not checked and counts as not passed")
        return {"base_status": UNSCORABLE, "plus_status": UNSCORABLE, "base_passed": False, "passed": False,
                "result": why}
    # a set without a line: the program was stopped while it ran (the wall limit) or died (os._exit, output flood)
    missing = "timeout" if result.status == "timed out" else "fail"
    base, plus = found.get("base", missing), found.get("plus", missing)
    passed = base == PASS and plus == PASS
    if passed:
        why = "passed"
    else:
        why = f"base: {base}, plus: {plus}" + (f" ({result.status}: {result.detail})" if result.detail else "")
    return {"base_status": base, "plus_status": plus, "base_passed": base == PASS, "passed": passed, "result": why}


def score_plus(problem: dict[str, Any], solution: str, mechanism: str, marker: str) -> dict[str, Any]:
    """Run one candidate against a release-file problem in the sandbox; its verdict fields."""
    return verdict(run_program(plus_program(problem, solution, marker), LIMITS, mechanism), marker)
