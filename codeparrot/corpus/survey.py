"""What `prepare` found, whatever ran it: the tally of the scans (bad records, filters, exact duplicates, the
survivors in input order), the near-duplicate clusters, the written splits, and the report made of them.

Shared by the stage's two drivers: the datatrove tasks (tasks.py) and the in-process worker pool (prepare.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .filters import FILTERS
from .report import (CLUSTERS_FILE, LENGTHS_PLOT, cluster_summary, decontamination_summary, length_hist,
                     length_histogram, mb_per_s, peak_rss_mb, plot_lengths, quality_summary, timing,
                     write_clusters)
from .shards import DECONTAMINATED, DUP_IN_SHARD, FILTERED, KEEP, QuietBad, Scan, Settings
from .source import LOGGED_BAD_RECORDS, BadRecords, shard_name

log = logging.getLogger(__name__)


@dataclass
class Survey:
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
    # One entry per survivor, in input order: its shard index, line and length, its quality bucket index, whether
    # that signal's value was unknown, its split (True: valid); signatures in per-shard blocks.
    shard_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    line_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    size_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    quality_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    quality_unknown_of: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    valid_of: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    signature_blocks: list[np.ndarray] = field(default_factory=list)
    not_selected: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> files, bytes (not in files_in)
    seconds: float = 0.0
    # per shard, while scans are added: its survivors' entries, in the order of the fields above
    _parts: list[tuple[np.ndarray, ...]] = field(default_factory=list, repr=False)

    @classmethod
    def new(cls, max_bad_ratio: float, enabled: tuple[str, ...]) -> Survey:
        return cls(BadRecords(max_ratio=max_bad_ratio), dict.fromkeys(enabled, 0), dict.fromkeys(enabled, 0))

    def add_scan(self, scan: Scan, shard: str, seen: set[bytes], exact: bool) -> np.ndarray:
        """Tally one shard's scan, in input order; the signature rows (candidates) of its survivors."""
        add_bad(self.bad, scan.bad)
        for reason, (files, size) in getattr(scan, "not_selected", {}).items():  # getattr: scans pickled before
            tally = self.not_selected.setdefault(reason, {"files": 0, "bytes": 0})
            tally["files"] += files
            tally["bytes"] += size
        self.files_in += len(scan.sizes)
        self.bytes_in += sum(scan.sizes)
        self.hist_in += length_hist(scan.sizes)
        rows, sig_rows = exact_dedup(scan, shard, seen, exact, self)
        candidates = np.array(sig_rows, dtype=np.int64)  # the scan's quality entries are per candidate
        self._parts.append((np.full(len(rows), scan.index, dtype=np.int64),
                            np.array(scan.lines, dtype=np.int64)[rows], np.array(scan.sizes, dtype=np.int64)[rows],
                            np.array(scan.quality, dtype=np.uint8)[candidates],
                            np.array(scan.quality_unknown, dtype=bool)[candidates],
                            np.array(scan.valid, dtype=bool)[candidates]))
        return candidates

    def finish(self) -> None:
        """After the last scan: the bad-ratio verdict, and the survivors' columns in one array each."""
        self.bad.check(final=True)
        if self._parts:
            (self.shard_of, self.line_of, self.size_of, self.quality_of, self.quality_unknown_of,
             self.valid_of) = (np.concatenate(c) for c in zip(*self._parts))
        self._parts = []


def add_bad(total: BadRecords, part: QuietBad) -> None:
    """Add a worker's bad records to the stage's, log its samples up to LOGGED_BAD_RECORDS in all, check the ratio."""
    for kind, where, detail in part.samples[:max(0, LOGGED_BAD_RECORDS - total.logged)]:
        log.warning("skipped %s at %s%s", kind, where, f": {detail}" if detail else "")
        total.logged += 1
        if total.logged == LOGGED_BAD_RECORDS:
            log.warning("further bad records are counted but not logged")
    total.good += part.good
    for kind, n in part.counts.items():
        total.counts[kind] = total.counts.get(kind, 0) + n
    total.check()


def exact_dedup(scan: Scan, shard: str, seen: set[bytes], exact: bool, survey: Survey) -> tuple[list, list]:
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


@dataclass
class NearDups:
    """Phase 2's near-dedup over the survivors."""

    drop: np.ndarray  # per survivor: True for each cluster member but the first
    clusters: list[list[int]] = field(default_factory=list)  # survivor rows, each sorted, ordered by first row
    signature_mb: float = 0.0
    seconds: float = 0.0


@dataclass
class Written:
    """Phase 3's result."""

    split: dict[str, int]  # SPLIT_KEYS: files and bytes written to train/ and valid/
    names: dict[tuple[int, int], dict[str, str]]  # (shard index, line) -> repo_name/path of each cluster member
    seconds: float = 0.0


def report_phase(tmp: Path, settings: Settings, files: list[Path], survey: Survey, near: NearDups,
                  written: Written, seconds: float, num_proc: int) -> dict[str, Any]:
    """Write the clusters file, report.json and the length plot into `tmp`; return the counts for the manifest."""
    def member(row: int) -> dict[str, Any]:
        shard, line = int(survey.shard_of[row]), int(survey.line_of[row])
        return {"shard": shard_name(files[shard]), "line": line + 1, **written.names.get((shard, line), {})}

    write_clusters(tmp / CLUSTERS_FILE, ([member(row) for row in cl] for cl in near.clusters))
    split, seconds = written.split, round(seconds, 2)
    kept = ~near.drop  # the kept survivors are the records written (the write phase checked that none is missing)
    quality, by_quality = quality_summary(settings.quality.signal, survey.quality_of[kept],
                                          survey.quality_unknown_of[kept], survey.valid_of[kept], survey.size_of[kept])
    counts = {  # the manifest's counts; report.json adds the fields of `report` below
        "files_in": survey.files_in, "bytes_in": survey.bytes_in, "not_selected": survey.not_selected,
        "exact_duplicates": survey.exact_duplicates, "bytes_exact_duplicates": survey.bytes_exact_duplicates,
        "near_duplicates": int(near.drop.sum()), "bytes_near_duplicates": int(survey.size_of[near.drop].sum()),
        **survey.bad.as_dict(),
        "removed_by_filter": survey.removed_by_filter, "bytes_removed_by_filter": survey.bytes_removed_by_filter,
        "decontaminated": len(survey.decontaminated_files), "bytes_decontaminated": survey.bytes_decontaminated,
        **split,
        "files_out": split["train_files"] + split["valid_files"],
        "bytes_out": split["train_bytes"] + split["valid_bytes"],
        "clusters": cluster_summary(near.clusters),
        "quality": quality,
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
        "length_histogram": {**length_histogram(survey.hist_in, length_hist(survey.size_of[kept])),
                             "after_by_quality": by_quality},
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not plot_lengths(report["length_histogram"], tmp / LENGTHS_PLOT, quality):
        log.info("prepare: matplotlib is not installed, no %s (pip install 'codeparrot[plot]')", LENGTHS_PLOT)
    return counts
