"""Per-shard work of `prepare`, run in worker processes, one input shard per task.

scan (phase 1) = read + columns + filters + decontamination + MinHash, returning compact per-record metadata;
write (phase 3) = re-read the shard and write its survivors into train/ and valid/ shards.
Workers are spawned (procs.WorkerPool): they receive Settings pickled once each, and these functions pickled by name
(module path). Sizes are UTF-8 bytes of `content`, the unit of every `bytes` count in the report.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import CorpusConfig
from .decontaminate import Decontaminator
from .filters import FILTERS, FilterSettings, QualityFilter, compute_columns, strip_whitespace
from .source import LOGGED_BAD_RECORDS, BadRecords, ShardWriter, iter_shard, utf8_len

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

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.samples) < LOGGED_BAD_RECORDS:
            self.samples.append((kind, where, detail))


@dataclass
class Settings:
    """What a worker process needs; pickled once per worker."""

    corpus: CorpusConfig
    filters: FilterSettings  # the enabled filters: chars_per_token only with a tokenizer
    decontam: Decontaminator | None


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
        from .dedup import MinHasher

        hasher = MinHasher(num_perm=c.minhash_num_perm, ngram=c.minhash_ngram, seed=c.minhash_seed)
    _worker.clear()
    _worker.update(settings=settings, quality=QualityFilter(settings.filters, tokenizer), hasher=hasher)


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
    columns: dict[int, dict[str, Any]] = field(default_factory=dict)  # line -> columns, KEEP lines, when asked


def scan_shard(task: tuple[int, str], keep_columns: bool = False) -> Scan:
    """Phase 1 for one shard: columns, in-shard exact duplicates, filters, decontamination, MinHash; with
    keep_columns, the candidates' columns too (the write phase then need not compute them again)."""
    index, path = task
    s: Settings = _worker["settings"]
    quality: QualityFilter = _worker["quality"]
    hasher = _worker["hasher"]
    bad = QuietBad()
    lines, digests, sizes, verdicts = [], [], [], []
    batch: list[str] = []
    batch_chars = 0
    blocks: list[np.ndarray] = []
    decontaminated: dict[int, dict[str, Any]] = {}
    seen_here: set[bytes] = set()
    kept_columns: dict[int, dict[str, Any]] = {}
    for line, record in iter_shard(path, bad):
        content = record["content"]
        stripped = strip_whitespace(content)
        try:  # JSON can escape lone surrogates ("\ud800"), which no UTF-8 writer accepts
            columns = compute_columns(content, stripped)
            json.dumps({k: v for k, v in record.items() if k != "content"}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad.good -= 1
            bad.add("invalid_utf8", f"{path}:{line + 1}", str(e)[:80])
            continue
        digest = bytes.fromhex(columns["hash"])
        lines.append(line)
        digests.append(digest)
        sizes.append(utf8_len(content))
        if s.corpus.exact_dedup:
            if digest in seen_here:  # a later copy in the same shard: an exact duplicate, whatever came before
                verdicts.append(DUP_IN_SHARD)
                continue
            seen_here.add(digest)
        reason = quality.reason(content, columns)
        if reason is not None:
            verdicts.append(FILTERED + FILTERS.index(reason))
            continue
        if s.decontam:
            found = s.decontam.find(content, stripped)
            if found:
                verdicts.append(DECONTAMINATED)
                decontaminated[line] = {**_where(record), "matches": [
                    {"benchmark": n.benchmark, "task_id": n.task_id, "field": n.field} for n in found]}
                continue
        verdicts.append(KEEP)
        if keep_columns:
            kept_columns[line] = columns
        if hasher is not None:
            batch.append(content)
            batch_chars += len(content)
            if batch_chars >= SIGNATURE_BATCH_CHARS:
                blocks.append(hasher.signatures(batch))
                batch, batch_chars = [], 0
    signatures = None
    if hasher is not None:
        if batch:
            blocks.append(hasher.signatures(batch))
        signatures = np.concatenate(blocks) if blocks else np.zeros((0, s.corpus.minhash_num_perm), dtype=np.uint32)
    return Scan(index, lines, digests, sizes, verdicts, signatures, decontaminated, bad, kept_columns)


def write_shard(task: tuple[int, str, np.ndarray, frozenset[int], str],
                columns: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Phase 3 for one shard: write its kept lines to train/ or valid/ (with the scan's `columns` when given, else
    computed again); the counts, and the cluster members' names."""
    # The result: index, the SPLIT_KEYS counts, missing (kept lines not found on re-reading), names (line -> where).
    index, path, keep_lines, members, out = task
    c: CorpusConfig = _worker["settings"].corpus
    keep = set(keep_lines.tolist())
    writers: dict[str, ShardWriter] = {}
    counts = dict.fromkeys(SPLIT_KEYS, 0)
    names: dict[int, dict[str, str]] = {}  # line -> repo_name/path of the cluster members, for the clusters file
    for line, record in iter_shard(path, QuietBad()):
        if line in members:
            names[line] = _where(record)
        if line not in keep:
            continue
        content = record["content"]
        side = "valid" if is_valid_repo(str(record.get("repo_name", "")), c.valid_fraction, c.split_seed) else "train"
        if side not in writers:
            # ShardWriter numbers its files from 0 in its own directory; renamed below to carry the input shard.
            writers[side] = ShardWriter(Path(out) / side / f".part-{index:012d}", c.output_shard_records,
                                        c.output_compresslevel)
        writers[side].write({**record, **(columns[line] if columns is not None else compute_columns(content))})
        counts[f"{side}_files"] += 1
        counts[f"{side}_bytes"] += utf8_len(content)
    for side, writer in writers.items():
        writer.close()
        for k, part in enumerate(sorted(writer.directory.iterdir())):
            part.rename(writer.directory.parent / f"file-{index:012d}-{k:06d}.json.gz")
        writer.directory.rmdir()
    missing = len(keep) - counts["train_files"] - counts["valid_files"]
    return {"index": index, **counts, "missing": missing, "names": names}
