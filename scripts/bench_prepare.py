"""Benchmark: near-dedup signatures + LSH (codeparrot.corpus.dedup) against datasketch, per core, on the same files.

    python scripts/bench_prepare.py                        # the first 40 MB of work/tiny/raw
    python scripts/bench_prepare.py --raw DIR --max-mb 100

The first --max-mb of content is copied into fresh shards (untimed), one set used by every contender:
  read       iter_shard alone (gzip + JSON), the floor under every contender;
  ours 1p    MinHasher signatures shard by shard (as prepare's scan workers compute them), then
             near_duplicate_clusters (numpy LSH banding, verification, array union-find);
  ours Np    the same with the shards spread over os.cpu_count() worker processes (codeparrot.procs.WorkerPool);
  reference  per file: datasketch MinHash(num_perm=256), m.update(token.encode()) per distinct CodeParrot token,
             MinHashLSH(threshold=0.85, num_perm=256).insert.
Goal: ours per core >= 3x the reference per core. The whole prepare stage is also timed per core on datatrove's
local executor (1 and all workers) and on the worker pool it replaced (corpus.executor=pool), with datatrove's
overhead and a resume after a failed write task (issue 13's goal: the stage per core >= 2x the datasketch reference
per core and >= 2x the pool's). Memory: near_duplicate_clusters' tracemalloc peak per file
(numpy buffers included; ~100 B, was ~4.2 KB with a dict-based index).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from codeparrot.corpus.dedup import MinHasher, duplicates_to_drop, near_duplicate_clusters
from codeparrot.corpus.source import BadRecords, ShardWriter, iter_shard, list_shards, utf8_len
from codeparrot.procs import WorkerPool

GOAL = 3.0  # ours per core / reference per core
NUM_PERM, THRESHOLD = 256, 0.85


def copy_prefix(raw: Path, out: Path, max_mb: float, n_shards: int) -> tuple[int, int]:
    """Copy records until max_mb of content into about n_shards new shards; (files, content bytes in UTF-8)."""
    records, size = [], 0
    for shard in list_shards(raw):
        for _, record in iter_shard(shard, BadRecords()):
            if size >= max_mb * 1e6:
                break
            records.append(record)
            size += utf8_len(record["content"])
    with ShardWriter(out, -(-len(records) // n_shards)) as writer:
        for record in records:
            writer.write(record)
    return len(records), size


def time_read(shards: list[Path]) -> float:
    start = time.perf_counter()
    for shard in shards:
        for _ in iter_shard(shard, BadRecords()):
            pass
    return time.perf_counter() - start


def shard_signatures(path: Path) -> np.ndarray:
    """[n, NUM_PERM] uint32 signatures of one shard's good records (token shingles, seed 1, as prepare's default)."""
    contents = [record["content"] for _, record in iter_shard(path, BadRecords())]
    return MinHasher(NUM_PERM, 1, 1).signatures(contents)


def time_ours(shards: list[Path], num_proc: int) -> tuple[float, float, np.ndarray, list[list[int]]]:
    """(signature seconds incl. reading and the workers' start, LSH seconds, signatures, clusters)."""
    start = time.perf_counter()
    with WorkerPool(num_proc) as pool:
        signatures = np.concatenate(list(pool.map(shard_signatures, shards)))
    mid = time.perf_counter()
    clusters = near_duplicate_clusters(signatures, THRESHOLD)
    return mid - start, time.perf_counter() - mid, signatures, clusters


def time_reference(shards: list[Path]) -> float:
    from datasketch import MinHash, MinHashLSH

    split = re.compile(r"[^A-Za-z_0-9]+")  # CodeParrot's tokenisation
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    i = 0
    for shard in shards:
        for _, record in iter_shard(shard, BadRecords()):
            m = MinHash(num_perm=NUM_PERM)
            for token in {t for t in split.split(record["content"]) if t}:
                m.update(token.encode())
            lsh.insert(i, m)
            i += 1
    return time.perf_counter() - start


def clustering_bytes_per_file(signatures: np.ndarray) -> float:
    """near_duplicate_clusters' peak memory per file beyond the signatures (tracemalloc sees numpy's buffers)."""
    tracemalloc.start()
    try:
        near_duplicate_clusters(signatures, THRESHOLD)
        return tracemalloc.get_traced_memory()[1] / len(signatures)
    finally:
        tracemalloc.stop()


def time_prepare(shard_dir: Path, work: Path, num_proc: int, executor: str = "local", fail: str = "",
                 more: tuple[str, ...] = ()) -> dict:
    """run_prepare's result on the shards, with its wall time; `fail` plants a task failure (tasks.py) first."""
    from codeparrot.config import load_config
    from codeparrot.corpus.engine import work_dir
    from codeparrot.corpus.prepare import run_prepare

    cfg = load_config(None, [f"paths.workdir={work}", f"paths.raw={shard_dir}", f"corpus.num_proc={num_proc}",
                             f"corpus.executor={executor}", *more])
    if fail:
        flags = work_dir(cfg).with_name(work_dir(cfg).name + ".inject-failure")
        flags.mkdir(parents=True, exist_ok=True)
        (flags / fail).touch()
    start = time.perf_counter()
    try:
        result = run_prepare(cfg)
    except Exception as e:  # the planted failure
        result = {"failed": str(e)}
    result["wall_seconds"] = time.perf_counter() - start
    return result


def stage_table(shard_dir: Path, tmp: Path, mb: float, cores: int, ref_per_core: float) -> None:
    """The whole stage per core: datatrove's local executor with 1 and N workers, and the worker pool (today's)."""
    before = ("corpus.output_compresslevel=6", "corpus.executor=pool")  # the stage as it was before issue 13
    runs = [("local executor (datatrove)", "local", 1, ()), ("local executor (datatrove)", "local", cores, ()),
            ("pool, same settings", "pool", 1, ()), ("pool, same settings", "pool", cores, ()),
            ("before: pool, gzip level 6", "pool", 1, before), ("before: pool, gzip level 6", "pool", cores, before)]
    results = {}
    print(f"\n{'whole stage':34}{'workers':>8}{'seconds':>9}{'MB/s':>8}{'MB/s/core':>11}{'x before/core':>15}"
          f"{'x datasketch/core':>19}")
    for name, executor, n, more in runs:
        results[name, n] = r = time_prepare(shard_dir, tmp / f"work-{len(results)}", n, executor, more=more)
        r["per_core"] = mb / r["wall_seconds"] / n
    base = results["before: pool, gzip level 6", 1]["per_core"]
    for name, executor, n, more in runs:
        r = results[name, n]
        print(f"{name:34}{n:8}{r['wall_seconds']:9.2f}{mb / r['wall_seconds']:8.2f}{r['per_core']:11.2f}"
              f"{r['per_core'] / base:15.2f}{r['per_core'] / ref_per_core:19.2f}")
    results.update({("local", n): results["local executor (datatrove)", n] for n in (1, cores)})
    results.update({("pool", n): results["pool, same settings", n] for n in (1, cores)})
    for n in (1, cores):
        local, pool = results["local", n]["wall_seconds"], results["pool", n]["wall_seconds"]
        phases = ", ".join(f"{k} {v.get('seconds')} s" for k, v in results["local", n]["phases"].items())
        print(f"datatrove's overhead at {n} worker(s): {local - pool:+.2f} s = {100 * (local - pool) / local:.0f}% "
              f"of the stage (local {local:.2f} s against pool {pool:.2f} s; local phases: {phases})")
    # resume: the last write task fails; the rerun redoes only it
    work = tmp / "work-resume"
    failed = time_prepare(shard_dir, work, cores, "local", fail=f"write-{len(list_shards(shard_dir)) - 1}")
    rerun = time_prepare(shard_dir, work, cores, "local")
    full = results["local", cores]["wall_seconds"]
    print(f"resume: a failed write task ({failed['wall_seconds']:.2f} s until it failed), then the rerun of the "
          f"unfinished tasks took {rerun['wall_seconds']:.2f} s against {full:.2f} s for a full run: "
          f"{full - rerun['wall_seconds']:.2f} s saved")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", default="work/tiny/raw", help="a directory of export shards")
    p.add_argument("--max-mb", type=float, default=40.0, help="MB of file content to benchmark on")
    p.add_argument("--no-prepare", action="store_true", help="skip timing the whole prepare stage")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp) / "raw"
        n_files, n_bytes = copy_prefix(Path(args.raw), shard_dir, args.max_mb, 4 * cores)
        shards = list_shards(shard_dir)
        mb = n_bytes / 1e6
        print(f"input: {n_files:,} files, {mb:.1f} MB of content, {len(shards)} shards; {cores} cores; "
              f"num_perm {NUM_PERM}, threshold {THRESHOLD}, token shingles")
        print("load average before: %.2f %.2f %.2f (other processes share these cores)" % os.getloadavg())

        read_s = time_read(shards)
        sig1, lsh1, signatures, clusters = time_ours(shards, 1)
        sigN, lshN, signatures_n, _ = time_ours(shards, cores)
        assert np.array_equal(signatures, signatures_n), "signatures differ between 1 and N processes"
        ref_s = time_reference(shards)
        print("load average after:  %.2f %.2f %.2f" % os.getloadavg())

        rows = [("read only (gzip+JSON)", read_s, 1),
                ("ours, 1 process", sig1 + lsh1, 1),
                (f"ours, {cores} processes", sigN + lshN, cores),
                ("reference datasketch, 1 process", ref_s, 1)]
        ref_per_core = mb / ref_s
        print(f"\n{'':34}{'seconds':>9}{'MB/s':>9}{'MB/s/core':>11}{'x ref/core':>12}")
        for name, seconds, procs in rows:
            per_core = mb / seconds / procs
            print(f"{name:34}{seconds:9.2f}{mb / seconds:9.2f}{per_core:11.2f}{per_core / ref_per_core:12.2f}")
        print(f"\nours, split: signatures {sig1:.2f} s on 1 process ({mb / sig1:.1f} MB/s, reading included), "
              f"{sigN:.2f} s on {cores}; LSH+verify+union-find {lsh1:.2f} s ({n_files / lsh1:,.0f} files/s)")
        ratio = (mb / (sig1 + lsh1)) / ref_per_core
        print(f"ours per core / reference per core: {ratio:.2f}x on 1 process, "
              f"{(mb / (sigN + lshN) / cores) / ref_per_core:.2f}x on {cores} (goal >= {GOAL}x on 1 process): "
              f"{'MET' if ratio >= GOAL else 'NOT MET'}")
        print(f"clusters: {len(clusters):,}, near-duplicates dropped: {len(duplicates_to_drop(clusters)):,} "
              f"of {n_files:,} files (exact copies included: no exact dedup runs here)")
        per_file = clustering_bytes_per_file(signatures)
        print(f"near_duplicate_clusters memory (numpy, tracemalloc peak): {per_file:.0f} bytes/file = "
              f"{per_file * 1e6 / 1e9:.3f} GB per million files (signatures, 1024 B/file, not included)")

        if not args.no_prepare:
            stage_table(shard_dir, Path(tmp), mb, cores, ref_per_core)
    return 0


if __name__ == "__main__":
    sys.exit(main())
