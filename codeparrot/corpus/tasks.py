"""`prepare` as datatrove tasks: scan (per shard) -> buckets (per band) -> cluster (one) -> write (per shard).

Each task reads and writes files in the work dir (corpus.work_dir: shared storage on a cluster) and owns its
outputs, so any executor (local processes, Slurm, Ray) runs them, and a rerun redoes only the tasks without a
completion marker. Layout of the work dir:

    scan/<i>.pkl                one shard's verdicts, sizes, digests, splits, bad records
    candidates/<i>.jsonl.gz     its candidates' output lines (record + columns), which the write task copies
    digests/<i>.npy             its records' MD5 digests [n, 2] uint64 (the cluster task sorts them all at once)
    signatures/<i>.npy          its candidates' MinHash signatures [n, num_perm] uint32 (memory-mapped later)
    sigs/bucket_<b>/<i>.minhash.sig   band b's keys of its candidates, sorted: datatrove's bucket input
    dups/<b>_<r>.dups           per band (and key range): consecutive pairs of equal keys, i.e. runs in input order,
                                in datatrove's format
    cluster/survey.pkl          the tally, the clusters and each survivor's fate
    cluster/keep/<i>.npz        the lines shard i writes, and those of its cluster members
    out/{train,valid}/...       the written shards; write/<i>.json their counts

Beside it, `<work dir>.inject-failure/<stage>-<i>` (tests) makes that task fail once: a file, not an environment
variable, because datatrove's workers keep the environment they started with.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from isal import igzip

from ..procs import die_with_parent
from .dedup import clusters_from_runs, duplicates_to_drop, verified_bands
from .shards import KEEP, SPLIT_KEYS, Settings, init_worker, scan_shard, worker_settings, write_candidates
from .source import WRITE_CHUNK, shard_name
from .survey import NearDups, Survey, Written

STAGES = ("scan", "buckets", "cluster", "write")
KEY_SPACE = 1 << 60  # band keys are below 2**60 (dedup.LSHBands.band_keys)
BAND_DTYPE = np.dtype([("key", "<u8"), ("doc", "<u4")])  # datatrove's signature-file records (hashes_per_bucket 1)
DUPS_DTYPE = np.dtype([("f1", "<u4"), ("d1", "<u4"), ("f2", "<u4"), ("d2", "<u4")])  # datatrove's .dups records


def quiet_datatrove_console() -> None:
    """datatrove logs (loguru) every task's start, pipeline, stats and failure traceback to the console. Keep its
    warnings there, and send the rest to each task's log file under the work dir: a failing stage then reads as
    the command's one-line error, and our own progress lines stay readable. Applied where tasks run (importing this
    module unpickles them there) and in the driver."""
    import datatrove.executor.base as base
    from loguru import logger

    def console_warnings(record) -> bool:
        return 30 <= record["level"].no < 40  # errors are re-raised to the driver, which reports them once

    def quiet_console() -> None:
        logger.remove()
        logger.add(sys.stderr, level="WARNING", filter=console_warnings, format="datatrove: {message}",
                   diagnose=False)

    task_file: list = []  # the running task's log file: one loguru sink for them all (an add costs 7 ms)

    def to_file(message) -> None:
        try:
            if task_file:
                task_file[0].write(message)
        except OSError:  # a full disk fails the task on its own; its log line must not add noise to that
            pass

    def task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        task_file[:] = [logfile]
        logger.info(f"Launching pipeline for {rank=}")
        return logfile

    def close_task_logger(logfile) -> None:
        logger.complete()
        task_file.clear()
        logfile.close()

    base.add_task_logger, base.close_task_logger = task_logger, close_task_logger
    quiet_console()
    # diagnose=False: loguru would print every local variable's value in a traceback, secrets included
    logger.add(to_file, level="DEBUG", colorize=False, diagnose=False)


quiet_datatrove_console()


class InjectedFailure(RuntimeError):
    """A failure a test asked for (inject-failure/<stage>-<rank>)."""


@dataclass
class WorkDir:
    """Paths of the work dir (a local directory; fsspec URLs are a later step)."""

    root: Path

    def shard(self, kind: str, index: int, suffix: str) -> Path:
        return self.root / kind / f"{index:05d}{suffix}"

    def bucket_sig(self, band: int, index: int) -> Path:
        return self.root / "sigs" / f"bucket_{band:03d}" / f"{index:05d}.minhash.sig"

    def fail_if_asked(self, stage: str, rank: int) -> None:
        """Raise when a test planted inject-failure/<stage>-<rank>; the flag is consumed, so a rerun passes."""
        flag = self.root.with_name(self.root.name + ".inject-failure") / f"{stage}-{rank}"
        if flag.exists():
            flag.unlink()
            raise InjectedFailure(f"injected failure of {stage} task {rank}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write a task output whole or not at all (a killed task leaves no half file that looks finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class GzipAtomic:
    """A gzip file (ISA-L, level 1) written whole or not at all: lines buffered, renamed into place on success."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.file = igzip.IGzipFile(self.tmp, "wb", compresslevel=1, mtime=0)
        self.buffer = bytearray()

    def write(self, line: bytes) -> None:
        self.buffer += line
        if len(self.buffer) >= WRITE_CHUNK:
            self.file.write(self.buffer)
            self.buffer.clear()

    def __enter__(self) -> "GzipAtomic":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.file.write(self.buffer)
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _ensure_worker(settings: Settings) -> None:
    """Build the per-process filter and hasher once per settings (a process may run many tasks)."""
    if worker_settings() is not settings:
        init_worker(settings)


def _sorted_band_records(keys: np.ndarray) -> bytes:
    """One band's (key uint64, doc uint32) records sorted by key then doc: datatrove's signature-file format."""
    records = np.empty(len(keys), dtype=BAND_DTYPE)
    records["key"], records["doc"] = keys, np.arange(len(keys), dtype=np.uint32)
    records.sort(order=("key", "doc"))
    return records.tobytes()


class Task:
    """A datatrove pipeline step over the shards; its repr is short because datatrove logs it (and loguru's
    tracebacks print every argument's repr)."""

    files: list[str]
    work: WorkDir
    order: Sequence[int] = ()  # rank -> shard (largest_first) in the stages over shards; empty: the rank itself

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.files)} shards)"

    def _start(self, stage: str, rank: int) -> None:
        """Every task's first step: in a local pool worker, die with the stage; then a test's planted failure."""
        import multiprocess

        if multiprocess.current_process().name != "MainProcess":
            # The worker's parent is the forkserver, which exits when the stage does (even on SIGKILL): the kernel
            # then ends the worker too, instead of leaving it to finish a long task for nobody.
            die_with_parent()
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task per core: no tokenizer threads on top
        self.work.fail_if_asked(stage, rank)

    def shard_of(self, rank: int) -> int:
        """The shard that a rank works on (its outputs keep the shard's index): with `order` from largest_first,
        a pool starts the biggest shards first and ends on small ones, instead of waiting on one big last shard."""
        return self.order[rank] if self.order else rank


def largest_first(sizes: list[int]) -> list[int]:
    """Shard indices by decreasing size (ties in input order): the task order of a stage over shards."""
    return sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@dataclass(repr=False)
class ScanTask(Task):
    """One shard: columns, filters, decontamination, digests, signatures and band keys into the work dir."""

    work: WorkDir
    files: list[str]
    settings: Settings
    order: list[int] = field(default_factory=list)  # rank -> shard (largest_first); empty: the rank itself

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        self._start("scan", rank)
        _ensure_worker(self.settings)
        index = self.shard_of(rank)
        with GzipAtomic(self.work.shard("candidates", index, ".jsonl.gz")) as candidates:
            scan = scan_shard((index, self.files[index]), candidates.write)
        signatures, scan.signatures = scan.signatures, None
        c = self.settings.corpus
        if signatures is not None:
            bands = verified_bands(c.minhash_threshold, c.minhash_num_perm)
            keys = bands.band_keys(signatures)  # [candidates, bands]
            for band in range(bands.bands):
                atomic_write(self.work.bucket_sig(band, index), _sorted_band_records(keys[:, band]))
            atomic_write(self.work.shard("signatures", index, ".npy"), _npy_bytes(signatures))
        digests = np.frombuffer(b"".join(scan.digests), dtype="<u8").reshape(-1, 2)
        atomic_write(self.work.shard("digests", index, ".npy"), _npy_bytes(digests))
        # last: its presence says the shard is scanned (datatrove's completion marker follows it)
        atomic_write(self.work.shard("scan", index, ".pkl"), pickle.dumps(scan, protocol=pickle.HIGHEST_PROTOCOL))


@dataclass(repr=False)
class BucketsTask(Task):
    """One band (or one key range of it): every shard's sorted keys merged, and each run of equal keys written as
    its consecutive pairs to dups/, as datatrove's MinhashDedupBuckets writes them (tests hold the two equal). In
    numpy: datatrove's Python heap merge cost ~7 us per file and band, a tenth of the stage."""

    work: WorkDir
    files: list[str]
    corpus: Any

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        self._start("buckets", rank)
        ranges = bucket_tasks_per_band(self.corpus)
        band, part = divmod(rank, ranges)
        low, high = (KEY_SPACE * part) // ranges, (KEY_SPACE * (part + 1)) // ranges  # keys are uniform hashes
        blocks = []
        for shard in range(len(self.files)):
            path = self.work.bucket_sig(band, shard)
            if not path.stat().st_size:
                continue
            records = np.memmap(path, dtype=BAND_DTYPE, mode="r")  # sorted by key: the range is one slice
            cut = np.searchsorted(records["key"], np.array([low, high], dtype=np.uint64))
            block = np.empty(cut[1] - cut[0], dtype=[("key", "<u8"), ("shard", "<u4"), ("doc", "<u4")])
            block["key"], block["doc"] = records["key"][cut[0]:cut[1]], records["doc"][cut[0]:cut[1]]
            block["shard"] = shard
            blocks.append(block)
        pairs = np.zeros(0, dtype=DUPS_DTYPE)
        if blocks:  # shard after shard, each sorted by (key, doc): a stable sort on key gives (key, shard, doc)
            merged = np.concatenate(blocks)
            merged = merged[np.argsort(merged["key"], kind="stable")]
            same = np.flatnonzero(merged["key"][1:] == merged["key"][:-1])  # [pairs] the first of each pair
            pairs = np.empty(len(same), dtype=DUPS_DTYPE)
            pairs["f1"], pairs["d1"] = merged["shard"][same], merged["doc"][same]
            pairs["f2"], pairs["d2"] = merged["shard"][same + 1], merged["doc"][same + 1]
        atomic_write(self.work.root / "dups" / f"{band:05d}_{part:02d}.dups", pairs.tobytes())


def bucket_tasks_per_band(corpus: Any) -> int:
    """Key ranges per band, each its own task: a band's task holds ~30 B per candidate of its range."""
    return max(1, int(corpus.bucket_tasks_per_band))


def band_count(corpus: Any) -> int:
    """The LSH bands of the corpus config."""
    return verified_bands(corpus.minhash_threshold, corpus.minhash_num_perm).bands


def band_runs(dups: np.ndarray, survivor_of: np.ndarray, first_candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One band's runs of equal keys among the survivors, from datatrove's pairs: (members, run), as
    dedup.clusters_from_runs takes them.

    datatrove writes, per run of equal keys in (shard, candidate) order, the consecutive pairs (x1, x2), (x2, x3)...;
    a run begins where a pair's first member is not the previous pair's second. Exact duplicates (survivor -1) leave
    their runs, as they were never near-dedup candidates in the one-process implementation. `survivor_of` maps every
    candidate of the corpus (shard after shard; shard f's begin at first_candidate[f]) to its survivor id or -1.
    """
    if not len(dups):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = survivor_of[first_candidate[dups["f1"]] + dups["d1"]]
    second = survivor_of[first_candidate[dups["f2"]] + dups["d2"]]
    starts = np.r_[True, (dups["f1"][1:] != dups["f2"][:-1]) | (dups["d1"][1:] != dups["d2"][:-1])]
    run = np.cumsum(starts) - 1
    members, runs = np.r_[first[starts], second], np.r_[run[starts], run]
    keep = members >= 0
    members, runs = members[keep], runs[keep]
    order = np.lexsort((members, runs))  # run after run, each in input order
    return members[order], runs[order]


@dataclass(repr=False)
class ClusterTask(Task):
    """The one task that sees the whole corpus: exact dedup in input order, near-dedup from the buckets' runs with
    verification and keep-first, the bad-ratio check; then each shard's lines to write."""

    work: WorkDir
    files: list[str]
    settings: Settings
    max_bad_ratio: float

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        self._start("cluster", rank)
        start = time.perf_counter()
        c = self.settings.corpus
        survey = Survey.new(self.max_bad_ratio, self.settings.filters.enabled)
        earlier = self._copies_of_earlier_shards() if c.exact_dedup else [np.zeros(0, np.int64)] * len(self.files)
        rows_of = []  # per shard: signature rows of its survivors
        survivor_of = []  # per shard: candidate -> survivor id, -1 for an exact duplicate
        for i, path in enumerate(self.files):
            scan = pickle.loads(self.work.shard("scan", i, ".pkl").read_bytes())
            # what the one-process implementation's set of every digest so far would answer, for this shard only
            seen = {scan.digests[j] for j in earlier[i]}
            rows = survey.add_scan(scan, shard_name(path), seen, c.exact_dedup)
            ids = np.full(scan.verdicts.count(KEEP), -1, dtype=np.int64)
            ids[rows] = np.arange(len(rows)) + sum(len(r) for r in rows_of)
            rows_of.append(rows)
            survivor_of.append(ids)
        del seen, earlier
        survey.finish()
        survey.seconds = time.perf_counter() - start
        near = self._near_dups(survey, rows_of, survivor_of)
        self._write_plan(survey, near)
        atomic_write(self.work.root / "cluster" / "survey.pkl", pickle.dumps((survey, near)))

    def _copies_of_earlier_shards(self) -> list[np.ndarray]:
        """Per shard, its records (indices into scan.digests) whose digest a file of an earlier shard has: every
        digest of the corpus sorted once (~50 B/file while it runs) instead of a set of them all (~100 B/file)."""
        blocks = [np.load(self.work.shard("digests", i, ".npy")) for i in range(len(self.files))]
        digests = np.concatenate(blocks) if blocks else np.zeros((0, 2), "<u8")
        shard = np.repeat(np.arange(len(blocks), dtype=np.int32), [len(b) for b in blocks])
        del blocks
        order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: each digest's files in input order
        sorted_digests = digests[order]
        starts = np.r_[True, (sorted_digests[1:] != sorted_digests[:-1]).any(axis=1)]
        del sorted_digests, digests
        group = np.cumsum(starts) - 1
        first_shard = shard[order][starts][group]  # per sorted file: the shard of its digest's first file
        later = np.sort(order[shard[order] > first_shard])  # files whose digest an earlier shard holds
        bounds = np.r_[0, np.cumsum(np.bincount(shard, minlength=len(self.files)))]
        cuts = np.searchsorted(later, bounds)
        return [later[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(self.files))]

    def _near_dups(self, survey: Survey, rows_of: list[np.ndarray], survivor_of: list[np.ndarray]) -> NearDups:
        """Clusters over the survivors, their signatures gathered into one memory-mapped file (never all in RAM)."""
        start = time.perf_counter()
        c = self.settings.corpus
        n = len(survey.shard_of)
        near = NearDups(drop=np.zeros(n, dtype=bool))
        if not c.near_dedup or not n:
            return near
        path = self.work.root / "cluster" / "signatures.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        signatures = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(n, c.minhash_num_perm))
        at = 0
        for i, rows in enumerate(rows_of):
            if len(rows):
                block = np.load(self.work.shard("signatures", i, ".npy"), mmap_mode="r")
                signatures[at:at + len(rows)] = block[rows]
                at += len(rows)
        signatures.flush()
        del signatures
        signatures = np.load(path, mmap_mode="r")
        near.signature_mb = round(signatures.nbytes / 1e6, 1)
        first_candidate = np.r_[0, np.cumsum([len(ids) for ids in survivor_of])].astype(np.int64)
        flat = np.concatenate(survivor_of)
        runs = (band_runs(self._dups(band), flat, first_candidate) for band in range(band_count(c)))
        near.clusters = clusters_from_runs(signatures, runs, c.minhash_threshold)
        near.drop[np.fromiter(duplicates_to_drop(near.clusters), dtype=np.int64)] = True
        near.seconds = time.perf_counter() - start
        return near

    def _dups(self, band: int) -> np.ndarray:
        """datatrove's pairs of one band (all its workers' files, in hash-range order)."""
        files = sorted((self.work.root / "dups").glob(f"{band:05d}_*.dups"))
        return np.concatenate([np.fromfile(f, dtype=DUPS_DTYPE) for f in files]) if files else np.zeros(0, DUPS_DTYPE)

    def _write_plan(self, survey: Survey, near: NearDups) -> None:
        """cluster/keep/<i>.npz: the lines shard i writes, and the lines of its cluster members (for their names)."""
        kept = ~near.drop
        members: dict[int, list[int]] = {}
        for cluster in near.clusters:
            for row in cluster:
                members.setdefault(int(survey.shard_of[row]), []).append(int(survey.line_of[row]))
        kept_shard, kept_line = survey.shard_of[kept], survey.line_of[kept]
        bounds = np.searchsorted(kept_shard, np.arange(len(self.files) + 1))  # survivors are in input order
        for i in range(len(self.files)):
            buffer = io.BytesIO()
            np.savez(buffer, keep=kept_line[bounds[i]:bounds[i + 1]],
                     members=np.array(sorted(members.get(i, [])), np.int64))
            atomic_write(self.work.shard("keep", i, ".npz"), buffer.getvalue())


@dataclass(repr=False)
class WriteTask(Task):
    """One shard: its kept records, with the scan's columns, into out/train or out/valid."""

    work: WorkDir
    files: list[str]
    settings: Settings
    order: list[int] = field(default_factory=list)  # rank -> shard, as ScanTask's

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        self._start("write", rank)
        _ensure_worker(self.settings)
        index = self.shard_of(rank)
        plan = np.load(self.work.shard("keep", index, ".npz"))
        scan = pickle.loads(self.work.shard("scan", index, ".pkl").read_bytes())
        out = self.work.root / "out"
        for side in ("train", "valid"):  # a rerun after a crash starts this shard's outputs afresh
            for old in (out / side).glob(f"file-{index:012d}-*.json.gz"):
                old.unlink()
            shutil.rmtree(out / side / f".part-{index:012d}", ignore_errors=True)
        with igzip.open(self.work.shard("candidates", index, ".jsonl.gz"), "rb") as lines:
            done = write_candidates(scan, lines, plan["keep"], frozenset(plan["members"].tolist()), str(out),
                                    self.settings.corpus)
        done["names"] = [[line, where] for line, where in done["names"].items()]
        atomic_write(self.work.shard("write", index, ".json"), json.dumps(done).encode())


def written_result(work: WorkDir, n_shards: int) -> Written:
    """The write tasks' counts and cluster-member names, merged."""
    written = Written(dict.fromkeys(SPLIT_KEYS, 0), {})
    missing = 0
    for i in range(n_shards):
        done = json.loads(work.shard("write", i, ".json").read_text())
        for key in SPLIT_KEYS:
            written.split[key] += done[key]
        missing += done["missing"]
        written.names.update({(i, line): where for line, where in done["names"]})
    if missing:
        raise RuntimeError(f"{missing} records to keep were not found when re-reading the raw shards; did the raw "
                           "export change during prepare?")
    return written
