"""`prepare` as datatrove tasks: scan (one per shard) -> buckets (datatrove's) -> cluster (one) -> write (one per shard).

Each task reads and writes files in the work dir (corpus.work_dir: shared storage on a cluster) and owns its
outputs, so any executor (local processes, Slurm, Ray) runs them, and a rerun redoes only the tasks without a
completion marker. Layout of the work dir:

    scan/<i>.pkl                one shard's verdicts, sizes, digests, columns of its candidates, bad records
    digests/<i>.npy             its records' MD5 digests [n, 2] uint64 (the cluster task sorts them all at once)
    signatures/<i>.npy          its candidates' MinHash signatures [n, num_perm] uint32 (memory-mapped later)
    sigs/bucket_<b>/<i>.minhash.sig   band b's keys of its candidates, sorted: datatrove's bucket input
    dups/<b>_00.dups            datatrove's output: consecutive pairs of equal keys, i.e. runs in input order
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..procs import die_with_parent
from .dedup import clusters_from_runs, duplicates_to_drop, verified_bands
from .shards import KEEP, SPLIT_KEYS, Settings, init_worker, scan_shard, worker_settings, write_shard
from .source import shard_name
from .survey import NearDups, Survey, Written

STAGES = ("scan", "buckets", "cluster", "write")


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

    def task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
        quiet_console()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")

        def to_file(message) -> None:
            try:
                logfile.write(message)
            except OSError:  # a full disk fails the task on its own; its log line must not add noise to that
                pass

        # diagnose=False: loguru would print every local variable's value in a traceback, secrets included
        logger.add(to_file, level="DEBUG", colorize=False, diagnose=False)
        logger.info(f"Launching pipeline for {rank=}")
        return logfile

    def close_task_logger(logfile) -> None:
        logger.complete()
        quiet_console()
        logfile.close()

    base.add_task_logger, base.close_task_logger = task_logger, close_task_logger
    quiet_console()


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


def _ensure_worker(settings: Settings) -> None:
    """Build the per-process filter and hasher once per settings (a process may run many tasks)."""
    if worker_settings() is not settings:
        init_worker(settings)


def _sorted_band_records(keys: np.ndarray) -> bytes:
    """One band's (key uint64, doc uint32) records sorted by key then doc: datatrove's signature-file format."""
    records = np.empty(len(keys), dtype=[("key", "<u8"), ("doc", "<u4")])
    records["key"], records["doc"] = keys, np.arange(len(keys), dtype=np.uint32)
    records.sort(order=("key", "doc"))
    return records.tobytes()


class Task:
    """A datatrove pipeline step over the shards; its repr is short because datatrove logs it (and loguru's
    tracebacks print every argument's repr)."""

    files: list[str]
    work: WorkDir

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

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        self._start("scan", rank)
        _ensure_worker(self.settings)
        scan = scan_shard((rank, self.files[rank]), keep_columns=True)
        signatures, scan.signatures = scan.signatures, None
        c = self.settings.corpus
        if signatures is not None:
            bands = verified_bands(c.minhash_threshold, c.minhash_num_perm)
            keys = bands.band_keys(signatures)  # [candidates, bands]
            for band in range(bands.bands):
                atomic_write(self.work.bucket_sig(band, rank), _sorted_band_records(keys[:, band]))
            atomic_write(self.work.shard("signatures", rank, ".npy"), _npy_bytes(signatures))
        digests = np.frombuffer(b"".join(scan.digests), dtype="<u8").reshape(-1, 2)
        atomic_write(self.work.shard("digests", rank, ".npy"), _npy_bytes(digests))
        # last: its presence says the shard is scanned (datatrove's completion marker follows it)
        atomic_write(self.work.shard("scan", rank, ".pkl"), pickle.dumps(scan, protocol=pickle.HIGHEST_PROTOCOL))


@dataclass(repr=False)
class BucketsTask(Task):
    """datatrove's MinhashDedupBuckets, unchanged, for one band: consecutive pairs of equal keys into dups/."""

    work: WorkDir
    files: list[str]
    corpus: Any

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

        self._start("buckets", rank)
        step = MinhashDedupBuckets(str(self.work.root / "sigs"), str(self.work.root / "dups"),
                                   config=bucket_config(self.corpus))
        step.run(None, rank, world_size)


def bucket_config(corpus) -> Any:
    """datatrove's MinhashConfig for our bands: one 64-bit key per band (our 60-bit band hash), sha1 (no xxhash)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    bands = verified_bands(corpus.minhash_threshold, corpus.minhash_num_perm)
    return MinhashConfig(num_buckets=bands.bands, hashes_per_bucket=1,
                         hash_config=HashConfig(precision=64, hash_fc="sha1"))


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


DUPS_DTYPE = np.dtype([("f1", "<u4"), ("d1", "<u4"), ("f2", "<u4"), ("d2", "<u4")])  # datatrove's .dups records


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
        runs = (band_runs(self._dups(band), flat, first_candidate) for band in range(bucket_config(c).num_buckets))
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

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        self._start("write", rank)
        _ensure_worker(self.settings)
        plan = np.load(self.work.shard("keep", rank, ".npz"))
        scan = pickle.loads(self.work.shard("scan", rank, ".pkl").read_bytes())
        out = self.work.root / "out"
        for side in ("train", "valid"):  # a rerun after a crash starts this shard's outputs afresh
            for old in (out / side).glob(f"file-{rank:012d}-*.json.gz"):
                old.unlink()
            shutil.rmtree(out / side / f".part-{rank:012d}", ignore_errors=True)
        done = write_shard((rank, self.files[rank], plan["keep"], frozenset(plan["members"].tolist()), str(out)),
                           scan.columns)
        done["names"] = [[line, where] for line, where in done["names"].items()]
        atomic_write(self.work.shard("write", rank, ".json"), json.dumps(done).encode())


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
