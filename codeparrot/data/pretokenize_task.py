"""`pretokenize` on corpus.executor: one datatrove task per clean shard, so a cluster user tokenizes where they
cleaned, and a rerun after a crash encodes only the shards not yet done.

The work dir (data.pretokenize_work_dir, default `<tokens>.work`) holds `bins/<split>/` (the shards' .bin and .docs
files), `results/<i>.json` (their counts, written last) and datatrove's logs and completion markers. Like prepare's,
it belongs to one identity of the stage and is removed once its files have moved into the staged tokens/.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..corpus.engine import SubmittedToSlurm, make_executor, open_work_dir, run_stage
from ..corpus.tasks import Task, WorkDir, atomic_write
from .encode_shard import docs_path, tokenize_shard


@dataclass(repr=False)
class TokenizeTask(Task):
    """One clean shard encoded into the work dir; its counts written last (they say the shard is done)."""

    work: WorkDir
    files: list[str]
    shards: list[tuple[str, str, str, int, str]]  # tokenize_shard's tasks, their dest inside the work dir

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        self._start("tokenize", rank)
        result = tokenize_shard(self.shards[rank])
        atomic_write(self.work.shard("results", rank, ".json"), json.dumps(result).encode())


def work_dir(cfg: Config) -> Path:
    """data.pretokenize_work_dir, or `<tokens>.work` beside tokens/."""
    tokens = cfg.paths.resolve("tokens")
    return Path(cfg.data.pretokenize_work_dir or tokens.with_name(tokens.name + ".work"))


def encode_on_executor(cfg: Config, shards: list[tuple], workers: int, identity: dict[str, Any]
                       ) -> list[dict[str, Any]]:
    """tokenize_shard over `shards` as datatrove tasks, resuming in the work dir; the files then moved to each
    shard's dest (the staged tokens/), and the work dir removed. The results in shard order."""
    work = open_work_dir(work_dir(cfg), identity)
    staged = [Path(s[1]) for s in shards]
    inside = [work.root / "bins" / dest.parent.name / dest.name for dest in staged]
    for path in inside:
        path.parent.mkdir(parents=True, exist_ok=True)
    step = TokenizeTask(work, [s[0] for s in shards], [(s[0], str(p), *s[2:]) for s, p in zip(shards, inside)])
    executor = make_executor(cfg, work, "tokenize", step, len(shards), workers, job="pretokenize",
                             preload=__name__)
    if run_stage(cfg, work, "tokenize", executor, len(shards), job="pretokenize"):
        raise SubmittedToSlurm(work.root, "pretokenize", "tokenize", "tokens/")
    results = [json.loads(work.shard("results", i, ".json").read_text()) for i in range(len(shards))]
    for source, dest in zip(inside, staged):
        shutil.move(source, dest)
        shutil.move(docs_path(source), docs_path(dest))
    shutil.rmtree(work.root)  # now: a failure after this point must not leave markers without their files
    return results
