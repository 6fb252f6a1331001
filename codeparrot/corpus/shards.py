"""Per-shard work of `prepare`, run in worker processes, one input shard per task.

scan (phase 1) = read + columns + filters + decontamination + quality bucket + MinHash, returning compact
per-record metadata, and (datatrove tasks) each candidate's output line; write (phase 3) = the survivors into train/
and valid/ shards, copied from those lines (write_candidates) or, in the worker pool, read again from the shard with
the same columns computed again (write_shard). Both write the same bytes.
Workers are spawned (procs.WorkerPool): they receive Settings pickled once each, and these functions pickled by name
(module path). Sizes are UTF-8 bytes of `content`, the unit of every `bytes` count in the report.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..config import CorpusConfig
from .decontaminate import Decontaminator
from .fields import FieldMap, Selection, check_needed
from .filters import FILTERS, FilterSettings, QualityFilter, Signals, compute_columns, stripped_utf8
from .quality import QUALITY_BUCKETS, UNKNOWN_QUALITY, QualityRule
from .source import LOGGED_BAD_RECORDS, BadRecords, ShardWriter, iter_shard, parse_record, record_line, utf8_len

KEEP, DUP_IN_SHARD, DECONTAMINATED, FILTERED = 0, 1, 2, 10  # scan verdicts; FILTERED + FILTERS.index(name)
SIGNATURE_BATCH_CHARS = 8_000_000  # text MinHashed together in a scan task (bounds a task's memory on huge shards)
SPLIT_KEYS = ("train_files", "train_bytes", "valid_files", "valid_bytes")


def is_valid_repo(repo_name: str, valid_fraction: float, seed: int) -> bool:
    """Stable repo-level split: a repository's files all land on the same side, on every machine."""
    digest = hashlib.md5(f"{seed}:{repo_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction


def _where(record: dict[str, Any]) -> dict[str, str]:
    """A record's repo_name and path, as the report names files."""
    return {"repo_name": str(record.get("repo_name", "")), "path": str(record.get("path", ""))}


@dataclass
class QuietBad(BadRecords):
    """BadRecords for a worker: counts, never raises, keeps the first samples for the main process to log."""

    samples: list = field(default_factory=list)

    def add(self, kind: str, where: str, detail: str = "", count: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + count
        if len(self.samples) < LOGGED_BAD_RECORDS:
            self.samples.append((f"{count} {kind}" if count != 1 else kind, where, detail))


@dataclass
class Settings:
    """What a worker process needs; pickled once per worker."""

    corpus: CorpusConfig
    filters: FilterSettings  # the enabled filters: chars_per_token only with a tokenizer
    decontam: Decontaminator | None
    quality: QualityRule = field(init=False)  # from `corpus`; built here so that a bad value fails before any task
    fields: FieldMap = field(init=False)  # the input's columns -> our fields (corpus.layout, corpus.fields)
    selection: Selection = field(init=False)  # the wanted files (corpus.languages, corpus.extensions)

    def __post_init__(self) -> None:
        self.quality = QualityRule.from_config(self.corpus)
        self.fields = FieldMap.from_config(self.corpus)
        check_needed(self.corpus, self.fields)
        self.selection = Selection.from_config(self.corpus)


_worker: dict[str, Any] = {}  # per-process state built by init_worker


def worker_settings() -> Settings | None:
    """The Settings this process was initialised with, if any."""
    return _worker.get("settings")


def init_worker(settings: Settings) -> None:
    """Build this process's filter, tokenizer and MinHasher once, for all its tasks."""
    c = settings.corpus
    tokenizer = None
    if "chars_per_token" in settings.filters.enabled:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(c.filter_tokenizer)
    hasher = None
    if c.near_dedup:
        from .minhash import MinHasher

        hasher = MinHasher(num_perm=c.minhash_num_perm, ngram=c.minhash_ngram, seed=c.minhash_seed,
                           scheme=c.minhash_scheme)
    _worker.clear()
    _worker.update(settings=settings, filter=QualityFilter(settings.filters, tokenizer), hasher=hasher)


@dataclass
class Scan:
    """Phase 1 result for one shard: per good record, in file order."""

    index: int
    lines: list[int]
    digests: list[bytes]
    sizes: list[int]
    verdicts: list[int]
    signatures: np.ndarray | None  # one row per KEEP verdict, in order
    decontaminated: dict[int, dict[str, Any]]  # line -> repo_name, path and the matched needles
    bad: QuietBad
    # one entry per KEEP verdict, in order (as `signatures`): its quality bucket index (UNKNOWN_QUALITY without a
    # signal), whether the signal's value was unknown (bad copies), its split (True: valid)
    quality: list[int] = field(default_factory=list)
    quality_unknown: list[bool] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)
    not_selected: dict[str, list[int]] = field(default_factory=dict)  # reason -> [files, bytes] of the unwanted files


class _Signer:
    """The candidates' MinHash signatures, computed in batches of SIGNATURE_BATCH_CHARS of text."""

    def __init__(self, hasher: Any, num_perm: int) -> None:
        self.hasher, self.num_perm = hasher, num_perm
        self.batch: list[str] = []
        self.chars = 0
        self.blocks: list[np.ndarray] = []

    def add(self, content: str) -> None:
        if self.hasher is None:
            return
        self.batch.append(content)
        self.chars += len(content)
        if self.chars >= SIGNATURE_BATCH_CHARS:
            self.blocks.append(self.hasher.signatures(self.batch))
            self.batch, self.chars = [], 0

    def signatures(self) -> np.ndarray | None:
        """One row per candidate, in order; None without near-dedup."""
        if self.hasher is None:
            return None
        if self.batch:
            self.blocks.append(self.hasher.signatures(self.batch))
        return np.concatenate(self.blocks) if self.blocks else np.zeros((0, self.num_perm), dtype=np.uint32)


def _grade(scan: Scan, s: Settings, record: dict[str, Any], columns: dict[str, Any], signals: Signals) -> None:
    """A candidate's quality bucket and split into `scan`, and its bucket's name into its columns."""
    c = s.corpus
    bucket, known = s.quality.grade(record, signals) if s.quality.enabled else (UNKNOWN_QUALITY, True)
    scan.quality.append(bucket)
    scan.quality_unknown.append(not known)
    scan.valid.append(is_valid_repo(str(record.get("repo_name", "")), c.valid_fraction, c.split_seed))
    if bucket != UNKNOWN_QUALITY:
        columns["quality"] = QUALITY_BUCKETS[bucket]


def _writable(record: dict[str, Any], content: str, where: str, bad: QuietBad) -> bytes | None:
    """The content without whitespace, as UTF-8 (what the hash reads), or None when the record cannot be written as
    a JSON line: counted bad, so that one odd value costs its record, never the task."""
    try:  # JSON can escape lone surrogates ("\ud800"), which no UTF-8 writer accepts
        stripped = stripped_utf8(content)
        record_line({k: v for k, v in record.items() if k != "content"})
        return stripped
    except UnicodeEncodeError as e:
        kind, detail = "invalid_utf8", str(e)[:80]
    except (TypeError, ValueError) as e:  # a value JSON cannot hold (datetime, Decimal, bytes) from a mapped column
        kind, detail = "unserializable_value", f"{type(e).__name__}: {e}"[:80]
    bad.good -= 1
    bad.add(kind, where, detail)
    return None


def scan_shard(task: tuple[int, str], candidate_line: Callable[[bytes], None] | None = None) -> Scan:
    """Phase 1 for one shard: columns, in-shard exact duplicates, filters, decontamination, quality bucket,
    MinHash; `candidate_line` receives each candidate's output line (record + columns), in order."""
    index, path = task
    s: Settings = _worker["settings"]
    filters: QualityFilter = _worker["filter"]
    scan = Scan(index, [], [], [], [], None, {}, QuietBad())
    signer = _Signer(_worker["hasher"], s.corpus.minhash_num_perm)
    seen_here: set[bytes] = set()
    for line, record in iter_shard(path, scan.bad, fields=s.fields):
        content = record["content"]
        unwanted = s.selection.reason(record)
        if unwanted:  # not part of the corpus at all (another language): counted apart, before any other step
            tally = scan.not_selected.setdefault(unwanted, [0, 0])
            tally[0] += 1
            tally[1] += utf8_len(content)
            continue
        stripped = _writable(record, content, f"{path}:{line + 1}", scan.bad)
        if stripped is None:
            continue
        columns = compute_columns(content, stripped)
        digest = bytes.fromhex(columns["hash"])
        scan.lines.append(line)
        scan.digests.append(digest)
        scan.sizes.append(utf8_len(content))
        if s.corpus.exact_dedup:
            if digest in seen_here:  # a later copy in the same shard: an exact duplicate, whatever came before
                scan.verdicts.append(DUP_IN_SHARD)
                continue
            seen_here.add(digest)
        signals = Signals(content)  # what the filters compute of it is reused by the quality heuristics
        reason = filters.reason(content, columns, signals)
        if reason is not None:
            scan.verdicts.append(FILTERED + FILTERS.index(reason))
            continue
        found = s.decontam.find(content, stripped) if s.decontam else None
        if found:
            scan.verdicts.append(DECONTAMINATED)
            scan.decontaminated[line] = {**_where(record), "matches": [
                {"benchmark": n.benchmark, "task_id": n.task_id, "field": n.field} for n in found]}
            continue
        scan.verdicts.append(KEEP)
        _grade(scan, s, record, columns, signals)
        if candidate_line is not None:
            candidate_line(record_line({**record, **columns}))
        signer.add(content)
    scan.signatures = signer.signatures()
    return scan


def _columns(s: Settings, record: dict[str, Any], content: str) -> dict[str, Any]:
    """A kept record's columns computed again, its quality bucket included, as the scan computed them."""
    columns = compute_columns(content)
    if s.quality.enabled:
        columns["quality"] = QUALITY_BUCKETS[s.quality.grade(record, Signals(content))[0]]
    return columns


class SplitWriters:
    """One input shard's survivors into out/train and out/valid, as file-<shard>-<k>.json.gz, with their counts."""

    def __init__(self, out: str | Path, index: int, corpus: CorpusConfig) -> None:
        self.out, self.index, self.corpus = Path(out), index, corpus
        self.writers: dict[str, ShardWriter] = {}
        self.counts = dict.fromkeys(SPLIT_KEYS, 0)

    def write(self, valid: bool, line: bytes, size: int) -> None:
        """One record's JSON line (record_line's bytes); `size` is its content's UTF-8 bytes."""
        side = "valid" if valid else "train"
        if side not in self.writers:
            # ShardWriter numbers its files from 0 in its own directory; renamed below to carry the input shard.
            self.writers[side] = ShardWriter(self.out / side / f".part-{self.index:012d}",
                                             self.corpus.output_shard_records, self.corpus.output_compresslevel)
        self.writers[side].write_line(line)
        self.counts[f"{side}_files"] += 1
        self.counts[f"{side}_bytes"] += size

    def close(self) -> dict[str, int]:
        """Close and name the files; the SPLIT_KEYS counts."""
        for writer in self.writers.values():
            writer.close()
            for k, part in enumerate(sorted(writer.directory.iterdir())):
                part.rename(writer.directory.parent / f"file-{self.index:012d}-{k:06d}.json.gz")
            writer.directory.rmdir()
        return self.counts


def _result(index: int, counts: dict[str, int], keep: set[int], names: dict[int, dict[str, str]]) -> dict[str, Any]:
    # index, the SPLIT_KEYS counts, missing (kept lines not found), names (cluster member's line -> where)
    missing = len(keep) - counts["train_files"] - counts["valid_files"]
    return {"index": index, **counts, "missing": missing, "names": names}


def write_shard(task: tuple[int, str, np.ndarray, frozenset[int], str]) -> dict[str, Any]:
    """Phase 3 for one shard, re-reading it: its kept lines, with their columns computed again, to train/ or
    valid/; the counts, and the cluster members' names."""
    index, path, keep_lines, members, out = task
    s: Settings = _worker["settings"]
    c = s.corpus
    keep = set(keep_lines.tolist())
    split = SplitWriters(out, index, c)
    names: dict[int, dict[str, str]] = {}  # line -> repo_name/path of the cluster members, for the clusters file
    for line, record in iter_shard(path, QuietBad(), fields=s.fields):
        if line in members:
            names[line] = _where(record)
        if line not in keep:
            continue
        content = record["content"]
        valid = is_valid_repo(str(record.get("repo_name", "")), c.valid_fraction, c.split_seed)
        split.write(valid, record_line({**record, **_columns(s, record, content)}), utf8_len(content))
    return _result(index, split.close(), keep, names)


def write_candidates(scan: Scan, candidate_lines: Iterable[bytes], keep_lines: np.ndarray, members: frozenset[int],
                     out: str, corpus: CorpusConfig) -> dict[str, Any]:
    """Phase 3 for one shard from its scan: the kept ones of the candidates' output lines (in the scan's order) to
    train/ or valid/, nothing parsed or serialised again; the counts, and the cluster members' names."""
    candidates = [i for i, verdict in enumerate(scan.verdicts) if verdict == KEEP]  # indices into scan.lines
    keep = set(keep_lines.tolist())
    split = SplitWriters(out, scan.index, corpus)
    names: dict[int, dict[str, str]] = {}
    for k, (i, line_bytes) in enumerate(zip(candidates, candidate_lines)):
        line = scan.lines[i]
        if line in members:
            names[line] = _where(parse_record(line_bytes))
        if line in keep:
            split.write(scan.valid[k], line_bytes, scan.sizes[i])
    return _result(scan.index, split.close(), keep, names)
