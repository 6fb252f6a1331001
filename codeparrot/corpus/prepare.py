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

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, ConfigError, CorpusConfig
from ..logs import progress_bar
from ..procs import WorkerPool
from ..stage import Stage
from .decontaminate import Decontaminator, benchmark_hashes
from .filters import FILTERS, FilterSettings
from .report import (CLUSTERS_FILE, LENGTHS_PLOT, cluster_summary, decontamination_summary, format_report,
                     length_hist, length_histogram, mb_per_s, peak_rss_mb, plot_lengths, timing, write_clusters)
from .shards import (DECONTAMINATED, DUP_IN_SHARD, FILTERED, KEEP, SPLIT_KEYS, QuietBad, Scan, Settings,
                     init_worker, scan_shard, write_shard)
from .shards import is_valid_repo  # re-exported: callers (tests, conftest) take the split rule from the stage
from .source import LOGGED_BAD_RECORDS, BadRecords, list_shards, shard_name, shard_size

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
    return Settings(c, filters, decontam)


def _build(cfg: Config, tmp: Path) -> dict[str, Any]:
    """The three phases into the staged directory `tmp`; the counts for the manifest."""
    raw, c = cfg.paths.raw_url() or cfg.paths.resolve("raw"), cfg.corpus
    files = list_shards(raw)
    if not files:
        raise FileNotFoundError(f"no export shards under {raw}; run `codeparrot export-local {raw}` or set paths.raw")
    settings = _settings(c)
    num_proc = min(c.num_proc if c.num_proc > 0 else (os.cpu_count() or 1), len(files))
    start = time.perf_counter()
    shard_bytes = [shard_size(f) for f in files]  # the progress bars' units
    with WorkerPool(num_proc, init_worker, (settings,)) as pool:
        survey = _scan_phase(pool, files, shard_bytes, settings, c.max_bad_ratio)
        near = _near_dedup_phase(survey, c)
        written = _write_phase(pool, files, shard_bytes, survey, near, tmp, raw)
        pool.close()  # joins the workers: RUSAGE_CHILDREN, read for the peak RSS, counts only waited-for ones
    counts = _report_phase(tmp, settings, files, survey, near, written, time.perf_counter() - start, num_proc)
    log.info("prepare: %s", format_report(counts))
    return counts


PREPARE = Stage(name="prepare", output="clean", keys=("corpus",), inputs=("raw",), extra_inputs=_extra_inputs,
                build=_build, help="filter, deduplicate, decontaminate and split the raw export into clean/")


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Clean `paths.raw` into `paths.clean/{train,valid}`; skipped when the manifest already matches."""
    return PREPARE.run(cfg)


@dataclass
class _Survey:
    """Phase 1 and exact dedup over the corpus: what each step removed, and the survivors in input order."""

    bad: BadRecords
    removed_by_filter: dict[str, int]  # enabled filter -> files it removed
    bytes_removed_by_filter: dict[str, int]
    files_in: int = 0
    bytes_in: int = 0
    exact_duplicates: int = 0
    bytes_exact_duplicates: int = 0
    bytes_decontaminated: int = 0
    decontaminated_files: list[dict[str, Any]] = field(default_factory=list)
    hist_in: np.ndarray = field(default_factory=lambda: length_hist(()))
    # One entry per survivor, in input order: its shard index, line and length; signatures in per-shard blocks.
    shard_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    line_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    size_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    signature_blocks: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0


def _add_bad(total: BadRecords, part: QuietBad) -> None:
    """Add a worker's bad records to the stage's, log its samples up to LOGGED_BAD_RECORDS in all, check the ratio."""
    logged = min(total.total_bad, LOGGED_BAD_RECORDS)  # each earlier bad record left a sample, up to the cap
    for kind, where, detail in part.samples[:LOGGED_BAD_RECORDS - logged]:
        log.warning("skipped %s at %s%s", kind, where, f": {detail}" if detail else "")
        logged += 1
        if logged == LOGGED_BAD_RECORDS:
            log.warning("further bad records are counted but not logged")
    total.good += part.good
    for kind, n in part.counts.items():
        total.counts[kind] = total.counts.get(kind, 0) + n
    total.check()


def _exact_dedup(scan: Scan, shard: str, seen: set[bytes], exact: bool, survey: _Survey) -> tuple[list, list]:
    """Tally one shard's verdicts into `survey`, exact duplicates of earlier shards included: (rows, signature rows)
    of its survivors."""
    rows, sig_rows = [], []
    candidate = -1  # row in scan.signatures: one per KEEP verdict
    for i, (line, digest, size, verdict) in enumerate(zip(scan.lines, scan.digests, scan.sizes, scan.verdicts)):
        if verdict == KEEP:
            candidate += 1
        if verdict == DUP_IN_SHARD or (exact and digest in seen):
            survey.exact_duplicates += 1
            survey.bytes_exact_duplicates += size
            continue
        if exact:
            seen.add(digest)  # whatever its verdict: later copies of a filtered file are exact duplicates too
        if verdict >= FILTERED:
            name = FILTERS[verdict - FILTERED]
            survey.removed_by_filter[name] += 1
            survey.bytes_removed_by_filter[name] += size
        elif verdict == DECONTAMINATED:
            survey.bytes_decontaminated += size
            survey.decontaminated_files.append({"shard": shard, "line": line + 1, **scan.decontaminated[line]})
        else:
            rows.append(i)
            sig_rows.append(candidate)
    return rows, sig_rows


def _scan_phase(pool: WorkerPool, files: list[Path], shard_bytes: list[int], settings: Settings,
                max_bad_ratio: float) -> _Survey:
    """Phase 1 in the workers; here, the bad-record policy and exact dedup as each shard's scan arrives, in order."""
    start = time.perf_counter()
    survey = _Survey(BadRecords(max_ratio=max_bad_ratio), dict.fromkeys(settings.filters.enabled, 0),
                     dict.fromkeys(settings.filters.enabled, 0))
    seen: set[bytes] = set()  # 16-byte MD5 digests: about 100 bytes per distinct file in a Python set
    shard_of, line_of, size_of = [], [], []  # per shard, its survivors' columns
    bar = progress_bar(sum(shard_bytes), desc="prepare: scan", unit="B", unit_scale=True)
    for scan in pool.map(scan_shard, [(i, str(f)) for i, f in enumerate(files)]):
        _add_bad(survey.bad, scan.bad)
        survey.files_in += len(scan.sizes)
        survey.bytes_in += sum(scan.sizes)
        survey.hist_in += length_hist(scan.sizes)
        rows, sig_rows = _exact_dedup(scan, shard_name(files[scan.index]), seen, settings.corpus.exact_dedup, survey)
        shard_of.append(np.full(len(rows), scan.index, dtype=np.int64))
        line_of.append(np.array(scan.lines, dtype=np.int64)[rows])
        size_of.append(np.array(scan.sizes, dtype=np.int64)[rows])
        if scan.signatures is not None:
            survey.signature_blocks.append(scan.signatures[np.array(sig_rows, dtype=np.int64)])
        bar.update(shard_bytes[scan.index])
        bar.set_postfix_str(f"{survey.files_in:,} files, "
                            f"{mb_per_s(survey.bytes_in, time.perf_counter() - start)} MB/s")
    bar.close()
    survey.bad.check(final=True)
    survey.seconds = time.perf_counter() - start
    if shard_of:
        survey.shard_of, survey.line_of, survey.size_of = map(np.concatenate, (shard_of, line_of, size_of))
    return survey


@dataclass
class _NearDups:
    """Phase 2's near-dedup over the survivors."""

    drop: np.ndarray  # per survivor: True for each cluster member but the first
    clusters: list[list[int]] = field(default_factory=list)  # survivor rows, each sorted, ordered by first row
    signature_mb: float = 0.0
    seconds: float = 0.0


def _near_dedup_phase(survey: _Survey, corpus: CorpusConfig) -> _NearDups:
    """Phase 2: MinHash-LSH clusters over the survivors, in input order; the first file of each cluster is kept."""
    start = time.perf_counter()
    near = _NearDups(drop=np.zeros(len(survey.shard_of), dtype=bool))
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


@dataclass
class _Written:
    """Phase 3's result."""

    split: dict[str, int]  # SPLIT_KEYS: files and bytes written to train/ and valid/
    names: dict[tuple[int, int], dict[str, str]]  # (shard index, line) -> repo_name/path of each cluster member
    seconds: float = 0.0


def _write_phase(pool: WorkerPool, files: list[Path], shard_bytes: list[int], survey: _Survey, near: _NearDups,
                 tmp: Path, raw: Path) -> _Written:
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
    written = _Written(dict.fromkeys(SPLIT_KEYS, 0), {})
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


def _report_phase(tmp: Path, settings: Settings, files: list[Path], survey: _Survey, near: _NearDups,
                  written: _Written, seconds: float, num_proc: int) -> dict[str, Any]:
    """Write the clusters file, report.json and the length plot into `tmp`; return the counts for the manifest."""
    def member(row: int) -> dict[str, Any]:
        shard, line = int(survey.shard_of[row]), int(survey.line_of[row])
        return {"shard": shard_name(files[shard]), "line": line + 1, **written.names.get((shard, line), {})}

    write_clusters(tmp / CLUSTERS_FILE, ([member(row) for row in cl] for cl in near.clusters))
    split, seconds = written.split, round(seconds, 2)
    counts = {  # the manifest's counts; report.json adds the fields of `report` below
        "files_in": survey.files_in, "bytes_in": survey.bytes_in,
        "exact_duplicates": survey.exact_duplicates, "bytes_exact_duplicates": survey.bytes_exact_duplicates,
        "near_duplicates": int(near.drop.sum()), "bytes_near_duplicates": int(survey.size_of[near.drop].sum()),
        **survey.bad.as_dict(),
        "removed_by_filter": survey.removed_by_filter, "bytes_removed_by_filter": survey.bytes_removed_by_filter,
        "decontaminated": len(survey.decontaminated_files), "bytes_decontaminated": survey.bytes_decontaminated,
        **split,
        "files_out": split["train_files"] + split["valid_files"],
        "bytes_out": split["train_bytes"] + split["valid_bytes"],
        "clusters": cluster_summary(near.clusters),
        "phases": {"scan": timing(survey.seconds, survey.bytes_in),
                   "near_dedup": {"seconds": round(near.seconds, 2), "files": len(survey.shard_of),
                                  "signature_mb": near.signature_mb},
                   "write": timing(written.seconds, survey.bytes_in)},
        "seconds": seconds, "mb_per_s": mb_per_s(survey.bytes_in, seconds), "num_proc": num_proc,
        "peak_rss_mb": peak_rss_mb(),
    }
    report = {
        **counts,
        "filters_active": list(settings.filters.enabled),
        "decontaminate": decontamination_summary(settings.decontam),
        "decontaminated_files": survey.decontaminated_files,
        # the kept survivors are exactly the records written (the write phase checked that none went missing)
        "length_histogram": length_histogram(survey.hist_in, length_hist(survey.size_of[~near.drop])),
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not plot_lengths(report["length_histogram"], tmp / LENGTHS_PLOT):
        log.info("prepare: matplotlib is not installed, no %s (pip install 'codeparrot[plot]')", LENGTHS_PLOT)
    return counts
