"""The `prepare` stage: raw export -> filtered, deduplicated (exact + near), decontaminated, repo-split corpus.

Three phases; only phase 2 holds state that grows with the corpus:
1. scan (parallel, one task per input shard): read the shard, compute the columns, apply the quality filters and
   the decontamination search, and MinHash the files that survive them. A task returns compact per-record
   metadata (line, hash, size, verdict, signature), never contents.
2. dedup (main process, shards in input order as their scans arrive): exact dedup over the hashes, first occurrence
   wins; then MinHash-LSH clustering of the surviving files, keeping the first file of each cluster.
   Memory: about 100 bytes per distinct hash (a Python set of 16-byte digests) plus the survivors' uint32
   signatures, survivors x minhash_num_perm x 4 bytes (twice that while the per-shard blocks are concatenated),
   plus, while clustering, numpy band keys, candidate pairs and union-find: ~50-100 bytes per survivor measured
   (tracemalloc, 1-3M files), so ~1.2 GB per million survivors in all at 256 permutations.
3. write (parallel, one task per input shard): re-read the shard and write its kept records to train/ or valid/
   as `file-<input shard index:012d>-<k:06d>.json.gz`; each task owns its output files, so the names and bytes
   do not depend on the number of processes.
Everything is written into `clean.tmp/` and swapped in at the end (`staged_dir`): an interrupted run leaves no
partial `clean/`. Phases 1 and 3 run in worker processes; their per-shard code is `shards.py`. `report.py`
presents the results: report.json's fields, the summary table, the length plot.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, ConfigError, CorpusConfig, identity
from ..logs import progress_bar
from ..procs import WorkerPool
from ..stage import Stage
from .decontaminate import Decontaminator, benchmark_hashes
from .filters import FilterSettings
from .formats import check_first_columnar
from .report import format_report, mb_per_s
from .shards import SPLIT_KEYS, Settings, init_worker, scan_shard, write_shard
from .shards import is_valid_repo  # noqa: F401  re-exported: callers (tests, conftest) take the split rule from here
from .source import list_shards, shard_name, shard_size
from .survey import NearDups, Survey, Written, report_phase

log = logging.getLogger(__name__)

def _sha256(path: str | Path) -> str:
    """A short content hash of an extra input, for the manifest."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _extra_inputs(cfg: Config) -> dict[str, str]:
    """The identities of the inputs besides raw/: the filter tokenizer's file and the benchmark files."""
    c = cfg.corpus
    extra: dict[str, str] = {}
    if c.filter_tokenizer and "chars_per_token" in c.filters:
        if not Path(c.filter_tokenizer).is_file():
            raise FileNotFoundError(f"corpus.filter_tokenizer={c.filter_tokenizer} does not exist")
        extra["filter_tokenizer"] = _sha256(c.filter_tokenizer)
    if c.decontaminate:
        extra["decontaminate"] = ",".join(f"{k}:{v}" for k, v in sorted(benchmark_hashes(c.decontaminate).items()))
    return extra


def _settings(c: CorpusConfig) -> Settings:
    """What the workers need from the corpus config: the enabled filters, the MinHash settings, the needles."""
    with_tokenizer = bool(c.filter_tokenizer)
    if "chars_per_token" in c.filters and not with_tokenizer:
        log.debug("prepare: the chars_per_token filter is off (corpus.filter_tokenizer is not set)")
    filters = FilterSettings.from_config(c, with_tokenizer)
    if not 0 < c.minhash_threshold <= 1 or c.minhash_num_perm < 2 or c.minhash_ngram < 1:
        raise ConfigError("corpus.minhash_threshold must be in (0, 1], corpus.minhash_num_perm >= 2 and "
                          f"corpus.minhash_ngram >= 1; got {c.minhash_threshold}, {c.minhash_num_perm}, "
                          f"{c.minhash_ngram}")
    decontam = Decontaminator.from_specs(c.decontaminate, c.decontaminate_min_chars) if c.decontaminate else None
    plain = CorpusConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(CorpusConfig)})
    return Settings(plain, filters, decontam)  # a plain copy: the tasks are pickled or deep-copied to run


def _build(cfg: Config, tmp: Path) -> dict[str, Any]:
    """The stage into the staged directory `tmp` (datatrove tasks, or the worker pool); the manifest's counts."""
    raw, c = cfg.paths.raw_url() or cfg.paths.resolve("raw"), cfg.corpus
    files = list_shards(raw)
    if not files:
        raise FileNotFoundError(f"no export shards under {raw}; run `codeparrot export-local {raw}` or set paths.raw")
    settings = _settings(c)
    check_first_columnar(files, settings.fields)  # a wrong corpus.layout stops here, naming the file's columns
    num_proc = min(c.num_proc if c.num_proc > 0 else (os.cpu_count() or 1), len(files))
    start = time.perf_counter()
    if c.executor == "pool":
        survey, near, written = _run_pool(files, settings, tmp, raw, num_proc)
    else:
        survey, near, written = _run_tasks(cfg, files, settings, tmp, num_proc)
    counts = report_phase(tmp, settings, files, survey, near, written, time.perf_counter() - start, num_proc)
    log.info("prepare: %s", format_report(counts))
    return counts


def _run_pool(files: list, settings: Settings, tmp: Path, raw, num_proc: int) -> tuple[Survey, NearDups, Written]:
    """The earlier implementation: one pool of our own worker processes, phases in this process (no resume)."""
    shard_bytes = [shard_size(f) for f in files]  # the progress bars' units
    with WorkerPool(num_proc, init_worker, (settings,)) as pool:
        survey = _scan_phase(pool, files, shard_bytes, settings, settings.corpus.max_bad_ratio)
        near = _near_dedup_phase(survey, settings.corpus)
        written = _write_phase(pool, files, shard_bytes, survey, near, tmp, raw)
        pool.close()  # joins the workers: RUSAGE_CHILDREN, read for the peak RSS, counts only waited-for ones
    return survey, near, written


def _run_tasks(cfg: Config, files: list, settings: Settings, tmp: Path, num_proc: int
               ) -> tuple[Survey, NearDups, Written]:
    """datatrove tasks on corpus.executor, resuming in the work dir; its outputs moved into `tmp`, then removed."""
    from .engine import open_work_dir, run_stages, start_local_workers, work_dir

    start_local_workers(cfg, num_proc)  # first: its imports overlap ours
    stage_identity = {"config": identity(cfg, PREPARE.keys), "inputs": PREPARE.input_fingerprints(cfg),
                      "files": [str(f) for f in files]}  # as Stage.run's: another one wipes the work dir
    work = open_work_dir(work_dir(cfg), stage_identity)
    survey, near, written, seconds = run_stages(cfg, work, [str(f) for f in files], settings, num_proc)
    survey.seconds, near.seconds = seconds["scan"], seconds.get("buckets", 0.0) + seconds["cluster"]
    written.seconds = seconds["write"]
    for side in ("train", "valid"):
        source = work.root / "out" / side
        if source.is_dir():
            os.replace(source, tmp / side)  # the same file system: the work dir lies beside clean/ by default
        else:
            (tmp / side).mkdir()
    if written.split["valid_files"] == 0:
        log.warning("prepare: no repository fell in the valid split; raise corpus.valid_fraction")
    shutil.rmtree(work.root)
    return survey, near, written


PREPARE = Stage(name="prepare", output="clean", keys=("corpus",), inputs=("raw",), extra_inputs=_extra_inputs,
                build=_build, help="filter, deduplicate, decontaminate and split the raw export into clean/")


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Clean `paths.raw` into `paths.clean/{train,valid}`; skipped when the manifest already matches."""
    return PREPARE.run(cfg)


def _scan_phase(pool: WorkerPool, files: list[Path], shard_bytes: list[int], settings: Settings,
                max_bad_ratio: float) -> Survey:
    """Phase 1 in the workers; here, the bad-record policy and exact dedup as each shard's scan arrives, in order."""
    start = time.perf_counter()
    survey = Survey.new(max_bad_ratio, settings.filters.enabled)
    seen: set[bytes] = set()  # 16-byte MD5 digests: about 100 bytes per distinct file in a Python set
    bar = progress_bar(sum(shard_bytes), desc="prepare: scan", unit="B", unit_scale=True)
    for scan in pool.map(scan_shard, [(i, str(f)) for i, f in enumerate(files)]):
        sig_rows = survey.add_scan(scan, shard_name(files[scan.index]), seen, settings.corpus.exact_dedup)
        if scan.signatures is not None:
            survey.signature_blocks.append(scan.signatures[sig_rows])
        bar.update(shard_bytes[scan.index])
        bar.set_postfix_str(f"{survey.files_in:,} files, "
                            f"{mb_per_s(survey.bytes_in, time.perf_counter() - start)} MB/s")
    bar.close()
    survey.finish()
    survey.seconds = time.perf_counter() - start
    return survey


def _near_dedup_phase(survey: Survey, corpus: CorpusConfig) -> NearDups:
    """Phase 2: MinHash-LSH clusters over the survivors, in input order; the first file of each cluster is kept."""
    start = time.perf_counter()
    near = NearDups(drop=np.zeros(len(survey.shard_of), dtype=bool))
    if corpus.near_dedup and len(survey.shard_of):
        from .dedup import duplicates_to_drop, near_duplicate_clusters

        signatures = np.concatenate(survey.signature_blocks)
        survey.signature_blocks.clear()  # now copied into `signatures`
        near.signature_mb = round(signatures.nbytes / 1e6, 1)
        log.info("prepare: clustering %d files (%.1f MB of signatures)", len(signatures), near.signature_mb)
        near.clusters = near_duplicate_clusters(signatures, threshold=corpus.minhash_threshold)
        del signatures
        near.drop[np.fromiter(duplicates_to_drop(near.clusters), dtype=np.int64)] = True
    near.seconds = time.perf_counter() - start
    return near


def _write_phase(pool: WorkerPool, files: list[Path], shard_bytes: list[int], survey: Survey, near: NearDups,
                 tmp: Path, raw: Path) -> Written:
    """Phase 3 in the workers: re-read each shard and write its kept records to train/ or valid/ under `tmp`."""
    start = time.perf_counter()
    members: dict[int, set[int]] = {}  # shard index -> lines of its cluster members
    for cl in near.clusters:
        for row in cl:
            members.setdefault(int(survey.shard_of[row]), set()).add(int(survey.line_of[row]))
    kept = ~near.drop
    kept_shard, kept_line = survey.shard_of[kept], survey.line_of[kept]
    bounds = np.searchsorted(kept_shard, np.arange(len(files) + 1))  # survivors are in input order: shard, line
    tasks = [(i, str(f), kept_line[bounds[i]:bounds[i + 1]], frozenset(members.get(i, ())), str(tmp))
             for i, f in enumerate(files)]
    written = Written(dict.fromkeys(SPLIT_KEYS, 0), {})
    missing = 0
    bar = progress_bar(sum(shard_bytes), desc="prepare: write", unit="B", unit_scale=True)
    for done in pool.map(write_shard, tasks):
        for key in SPLIT_KEYS:
            written.split[key] += done[key]
        missing += done["missing"]
        written.names.update({(done["index"], line): m for line, m in done["names"].items()})
        bar.update(shard_bytes[done["index"]])
    bar.close()
    (tmp / "train").mkdir(exist_ok=True)  # both splits exist, even when empty
    (tmp / "valid").mkdir(exist_ok=True)
    if missing:
        raise RuntimeError(f"{missing} records to keep were not found when re-reading the raw shards; "
                           f"did {raw} change during prepare?")
    written.seconds = time.perf_counter() - start
    if written.split["valid_files"] == 0:
        log.warning("prepare: no repository fell in the valid split; raise corpus.valid_fraction")
    return written
