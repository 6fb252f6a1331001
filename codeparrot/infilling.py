"""HumanEval's infilling tasks (Bavarian et al. 2022), derived from the HumanEval problems as
openai/human-eval-infilling derived them, so that pass@k compares with the published numbers.

The derivation follows that repository's data files; the task counts match its published 1,033 and 5,815
(tests/test_infilling.py checks them):
- a canonical solution is split on "\\n"; a line is maskable when it holds more than whitespace;
- single-line (`infill-single-line`): each maskable line i in turn is the middle: 1,033 tasks over the 164 problems,
  named `SingleLineInfilling/HumanEval/<n>/L<i>`;
- multi-line (`infill-multi-line`): every span of lines i..j (i <= j, so single lines too) whose first and last lines
  are maskable: 5,815 tasks, named `MultiLineInfilling/HumanEval/<n>/L<i>_L<j>`.
The prefix is the problem's prompt, the lines before the span joined by "\\n", then "\\n"; so a span that starts at the
first line leaves an extra blank line after the docstring. That is a quirk of the published files, kept on purpose.

A task is a problem in human-eval-infilling's format: `task_id`, `prompt` (the prefix), `suffix`, `canonical_solution`
(the middle), `test`, `entry_point`. The program checked is prompt + middle + suffix + test + `check(entry_point)`.
"""
from __future__ import annotations

from typing import Any

COMPLETION = "completion"  # the humaneval.task that is HumanEval itself: left-to-right completion


def maskable_lines(solution: str) -> tuple[list[str], list[int]]:
    """The solution's lines (split on "\\n", without it) and the indices of those that hold more than whitespace."""
    lines = solution.split("\n")
    return lines, [i for i, line in enumerate(lines) if line.strip()]


def span_task(problem: dict[str, Any], lines: list[str], first: int, last: int, task_id: str) -> dict[str, Any]:
    """The task whose middle is lines first..last of the problem's canonical solution."""
    return {
        "task_id": task_id,
        "prompt": problem["prompt"] + "\n".join(lines[:first]) + "\n",
        "suffix": "\n".join(lines[last + 1:]),
        "canonical_solution": "\n".join(lines[first:last + 1]) + "\n",
        "test": problem["test"],
        "entry_point": problem["entry_point"],
    }


def single_line_tasks(problem: dict[str, Any]) -> list[dict[str, Any]]:
    """Each maskable line of the problem's canonical solution masked in turn."""
    lines, keep = maskable_lines(problem["canonical_solution"])
    return [span_task(problem, lines, i, i, f"SingleLineInfilling/{problem['task_id']}/L{i}") for i in keep]


def multi_line_tasks(problem: dict[str, Any]) -> list[dict[str, Any]]:
    """Every span of the canonical solution's lines that starts and ends on a maskable line."""
    lines, keep = maskable_lines(problem["canonical_solution"])
    return [span_task(problem, lines, i, j, f"MultiLineInfilling/{problem['task_id']}/L{i}_L{j}")
            for i in keep for j in keep if j >= i]


INFILL_TASKS = {"infill-single-line": single_line_tasks, "infill-multi-line": multi_line_tasks}  # humaneval.task
TASKS = (COMPLETION, *INFILL_TASKS)


def infilling_tasks(problems: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The infilling tasks of `task` (a key of INFILL_TASKS) derived from problems, in problem and span order."""
    if task not in INFILL_TASKS:
        raise ValueError(f"unknown infilling task {task!r}; one of: {', '.join(INFILL_TASKS)}")
    missing = [p["task_id"] for p in problems if not isinstance(p.get("canonical_solution"), str)]
    if missing:
        raise ValueError(f"infilling tasks are cut from each problem's canonical_solution, which {missing[0]} lacks")
    return [t for p in problems for t in INFILL_TASKS[task](p)]
