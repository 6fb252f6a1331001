"""Results keyed on the checkpoint they were made from: the fingerprint of its weights, checked before a skip.

`evaluate` and `humaneval` record `checkpoint_fingerprint` in their result files, so a checkpoint retrained under
the same `step-N` name is evaluated and scored again instead of skipped; results it replaces are moved aside, never
overwritten (`move_aside`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"  # what a checkpoint's fingerprint covers: the weights every stage loads
FINGERPRINT = "checkpoint_fingerprint"  # the key under which result files record it


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; memoized by its size and mtime, so that evaluate and humaneval in one pipeline hash once."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_fingerprint(checkpoint: str | Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of a checkpoint's weights: sha256, size and mtime of its model.safetensors.

    A `known` fingerprint (a result file's) whose size and mtime still match is returned as it is, unhashed: a
    retrain rewrites the file (a new mtime), and hashing a 6 GB file at every pipeline run is not cheap.
    """
    st = (Path(checkpoint) / WEIGHTS).stat()
    stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if isinstance(known, dict) and isinstance(known.get("sha256"), str) and \
            {k: known.get(k) for k in stat} == stat:
        return known
    return {"sha256": _sha256(str(Path(checkpoint) / WEIGHTS), **stat), **stat}


def same_weights(recorded: Any, fingerprint: dict[str, Any]) -> bool:
    """Whether a recorded fingerprint (None in results made before fingerprints) names these weights."""
    return isinstance(recorded, dict) and recorded.get("sha256") == fingerprint["sha256"]


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON file through a temp file of this process (ranks may write the same file at once)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def result_for(path: Path, checkpoint: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the result at `path` if it was made from the checkpoint's weights as they are now, else None; their
    fingerprint, else None when there was no result to compare with: the run then takes it on its main process)."""
    if not path.is_file():
        return None, None
    old = json.loads(path.read_text())
    fingerprint = checkpoint_fingerprint(checkpoint, old.get(FINGERPRINT))
    if not same_weights(old.get(FINGERPRINT), fingerprint):  # retrained under the same name, or an old result
        return None, fingerprint
    if fingerprint is not old[FINGERPRINT]:  # the same weights, copied (a new mtime): cheap to check again next time
        write_json(path, {**old, FINGERPRINT: fingerprint})
    return old, fingerprint


def move_aside(path: Path, why: str, logger: logging.Logger = log) -> Path:
    """Rename a result file or directory to <name>.replaced-<time>[.json]: replaced results are kept, not lost."""
    stem, suffix = (path.stem, path.suffix) if path.is_file() else (path.name, "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{stem}.replaced-{stamp}{suffix}"), 1
    while aside.exists():  # two replacements in one second: moving a directory onto one would nest it
        n += 1
        aside = path.with_name(f"{stem}.replaced-{stamp}-{n}{suffix}")
    logger.warning("%s %s; moved to %s", path, why, aside)
    shutil.move(path, aside)
    return aside


def validation_settings(cfg: "Config", checkpoint: Path, processes: int) -> dict[str, Any]:
    """What a validation loss depends on besides the weights: the validation data's and the tokenizer's identity,
    the data keys, the evaluation budget and the process count (each process evaluates up to eval.max_batches
    batches). `evaluate` records it; `compare` refuses losses whose settings differ."""
    from .artifacts import fingerprint

    d, e = cfg.data, cfg.eval
    # evaluate reads the token shards, or clean/valid's records when it selects by quality (data/splits.py)
    split = cfg.paths.resolve("tokens" if d.pretokenized and not (e.quality_bucket or e.quality_token) else "clean")
    try:
        data = fingerprint(split)
    except FileNotFoundError:
        data = f"{split} (absent)"
    tokenizer = Path(checkpoint) / "tokenizer.json"
    tok = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:16] if tokenizer.is_file() else "absent"
    # data.document_mask is left out: like model.arch, it is part of the recipe being compared (the same tokens and
    # targets are scored, each model reading them as it was trained to)
    return {"valid_data": data, "tokenizer_sha256": tok, "seq_length": d.seq_length, "quality_tokens": d.quality_tokens,
            "max_batches": e.max_batches, "batch_size": e.batch_size, "quality_bucket": e.quality_bucket,
            "quality_token": e.quality_token, "processes": processes}
