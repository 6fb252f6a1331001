"""The `export-local` stage and `pipeline`, which runs every stage in order and skips finished ones."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .artifacts import is_up_to_date, read_manifest, staged_dir, write_manifest
from .config import Config
from .corpus.source import default_local_roots, export_local

log = logging.getLogger(__name__)


def run_export_local(out: str | Path, roots: list[str] | None = None, shard_records: int = 2000,
                     max_files: int = 0) -> dict[str, Any]:
    """Export the local installation's `.py` files as BigQuery-format shards under `out`."""
    out = Path(out)
    roots = [str(Path(r).resolve()) for r in (roots or default_local_roots())]
    config = {"roots": roots, "shard_records": shard_records, "max_files": max_files, "python": sys.version.split()[0]}
    if is_up_to_date(out, "export-local", config, {}):
        log.info("export-local: %s is up to date, skipping", out)
        return {"skipped": True, **read_manifest(out)["counts"]}
    start = time.perf_counter()
    with staged_dir(out) as tmp:
        stats = export_local(tmp, roots, shard_records, max_files)
        counts = dict(vars(stats))
        write_manifest(tmp, "export-local", config, {}, counts, time.perf_counter() - start)
    log.info("export-local: %d files (%.1f MB) in %d shards; skipped %d not UTF-8, %d unreadable, %d empty",
             stats.files, stats.bytes / 1e6, stats.shards, stats.skipped_not_utf8, stats.skipped_unreadable,
             stats.skipped_empty)
    return {"skipped": False, **counts, "seconds": round(time.perf_counter() - start, 2)}


def pipeline_stages(cfg: Config) -> list[tuple[str, Callable[[Config], dict[str, Any]]]]:
    """The stages `pipeline` runs, in order, for this config."""
    from .corpus.prepare import run_prepare
    from .data.tokens import run_pretokenize
    from .evaluate import run_evaluate_latest
    from .tokenizer import run_train_tokenizer
    from .train import run_train

    stages: list[tuple[str, Callable[[Config], dict[str, Any]]]] = []
    raw = cfg.paths.resolve("raw")
    raw_manifest = read_manifest(raw)
    foreign = raw.exists() and (raw_manifest or {}).get("stage") != "export-local"
    if cfg.corpus.source == "local" and foreign:  # never overwrite an export we did not make
        log.info("pipeline: %s holds an export not made by export-local; using it as it is", raw)
    elif cfg.corpus.source == "local":
        stages.append(("export-local", lambda c: run_export_local(
            raw, c.corpus.local_roots or None, c.corpus.export_shard_records, c.corpus.local_max_files)))
    elif not raw.exists():
        raise FileNotFoundError(f"paths.raw={raw} does not exist and corpus.source is {cfg.corpus.source!r}, not 'local'")
    stages += [("prepare", run_prepare), ("train-tokenizer", run_train_tokenizer)]
    if cfg.data.pretokenized:  # train reads tokens/ instead of tokenizing clean/ on the fly
        stages.append(("pretokenize", run_pretokenize))
    return stages + [("train", run_train), ("evaluate", run_evaluate_latest)]


def run_pipeline(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run every stage in order; each stage skips itself when its manifest matches."""
    results = {}
    for name, stage in pipeline_stages(cfg):
        log.info("pipeline: stage %s", name)
        results[name] = stage(cfg)
    return results
