"""Benchmark: near-dedup signatures + LSH (codeparrot.corpus.dedup) against datasketch, per core, on the same files.

    python scripts/bench_prepare.py                        # the first 40 MB of work/tiny/raw
    python scripts/bench_prepare.py --raw DIR --max-mb 100
    python scripts/bench_prepare.py --format jsonl,parquet,avro   # the stage on each input format, side by side

The first --max-mb of content is copied into fresh shards (untimed), one set used by every contender:
  read       iter_shard alone (gzip + JSON), the floor under every contender;
  ours 1p    MinHasher signatures shard by shard (as prepare's scan workers compute them; densified one
             permutation hashing, and the classic permutations), then near_duplicate_clusters (numpy LSH banding,
             verification, array union-find);
  ours Np    the same with the shards spread over os.cpu_count() worker processes (codeparrot.procs.WorkerPool);
  reference  per file: datasketch MinHash(num_perm=256), m.update(token.encode()) per distinct CodeParrot token,
             MinHashLSH(threshold=0.85, num_perm=256).insert.
Goal: ours per core >= 3x the reference per core. Then both schemes' Jaccard error on real pairs.

The whole `codeparrot prepare` command is timed per core (1 and all workers, interpreter start to report): this
tree on datatrove's local executor, on the worker pool (corpus.executor=pool) and with the classic scheme, and the
stage as it was before issue 13 (a git worktree of --before, run with its own modules). Issue 13's goal: this tree
per core >= 2x the datasketch reference per core and >= 2x the stage before. Then datatrove's overhead (local against
pool, in-process) and a resume after a failed write task. Memory: near_duplicate_clusters' tracemalloc peak per file
(numpy buffers included; ~100 B, was ~4.2 KB with a dict-based index).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from codeparrot.corpus.dedup import duplicates_to_drop, exact_jaccard, near_duplicate_clusters
from codeparrot.corpus.minhash import MinHasher, shingles
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


def shard_signatures(path: Path, scheme: str = "oph") -> np.ndarray:
    """[n, NUM_PERM] uint32 signatures of one shard's good records (token shingles, seed 1, as prepare's default)."""
    contents = [record["content"] for _, record in iter_shard(path, BadRecords())]
    return MinHasher(NUM_PERM, 1, 1, scheme).signatures(contents)


def time_ours(shards: list[Path], num_proc: int, scheme: str = "oph"
              ) -> tuple[float, float, np.ndarray, list[list[int]]]:
    """(signature seconds incl. reading and the workers' start, LSH seconds, signatures, clusters)."""
    start = time.perf_counter()
    with WorkerPool(num_proc) as pool:
        signatures = np.concatenate(list(pool.map(functools.partial(shard_signatures, scheme=scheme), shards)))
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


BEFORE = "b1d7520"  # the last commit before issue 13: prepare as the worker pool it was ("today's" in the issue)


def before_checkout(ref: str, tmp: Path) -> Path | None:
    """A checkout of `ref` (git worktree) to time the stage as it was; None without git history."""
    root = Path(__file__).resolve().parents[1]
    where = tmp / f"before-{ref}"
    done = subprocess.run(["git", "-C", str(root), "worktree", "add", "-f", "--detach", str(where), ref],
                          capture_output=True, text=True)
    return where if done.returncode == 0 else None


def time_command(code: Path, shard_dir: Path, work: Path, num_proc: int, *more: str) -> tuple[float, str]:
    """Wall seconds of `python -m codeparrot prepare` from the checkout `code` (its own modules), and clean/'s
    content digest: interpreter start, imports, the report and its plot included, as a user runs it."""
    cmd = [sys.executable, "-m", "codeparrot", "prepare", f"paths.workdir={work}", f"paths.raw={shard_dir}",
           f"corpus.num_proc={num_proc}", *more]
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds, clean_digest(work / "clean")


def clean_digest(clean: Path) -> str:
    """What the records of clean/ say, whatever the JSON spacing or gzip level: sorted decoded records per split."""
    h = hashlib.sha256()
    for split in ("train", "valid"):
        rows = sorted(json.dumps(r, sort_keys=True) for f in list_shards(clean / split)
                      for _, r in iter_shard(f, BadRecords()))
        h.update(f"{split}:{len(rows)}\n".encode() + "\n".join(rows).encode())
    return h.hexdigest()[:12]


def stage_table(shard_dir: Path, tmp: Path, mb: float, cores: int, ref_per_core: float, before: str) -> None:
    """The whole command per core: this tree on datatrove's local executor and on the worker pool, and the stage as
    it was before issue 13 (git `before`), 1 and N workers each, on the same files."""
    here = Path(__file__).resolve().parents[1]
    old = before_checkout(before, tmp)
    runs = [("this tree, local executor", here, n, ()) for n in (1, cores)]
    runs += [("this tree, pool executor", here, n, ("corpus.executor=pool",)) for n in (1, cores)]
    runs += [("this tree, classic permutations", here, n, ("corpus.minhash_scheme=permutations",)) for n in (1,)]
    if old is not None:
        runs += [(f"before issue 13 (git {before})", old, n, ()) for n in (1, cores)]
    else:
        print(f"(no git checkout of {before}: the before-issue-13 rows are left out)")
    times = {}
    for name, code, n, more in runs:
        times[name, n] = time_command(code, shard_dir, tmp / f"cmd-{len(times)}", n, *more)
    base = {n: times[f"before issue 13 (git {before})", n][0] for n in (1, cores)} if old is not None else None
    print(f"\n{'the whole command':36}{'workers':>8}{'seconds':>9}{'MB/s/core':>11}{'x before/core':>15}"
          f"{'x datasketch/core':>19}{'clean/ digest':>15}")
    for name, code, n, more in runs:
        seconds, digest = times[name, n]
        ratio = f"{base[n] / seconds:15.2f}" if base else f"{'':>15}"
        print(f"{name:36}{n:8}{seconds:9.2f}{mb / seconds / n:11.2f}{ratio}{mb / seconds / n / ref_per_core:19.2f}"
              f"{digest:>15}")
    if old is not None:
        subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(old)], capture_output=True)
    print("(equal digests: the same records; the classic scheme and the old code may keep other near-duplicates)")


def overhead_and_resume(shard_dir: Path, tmp: Path, cores: int) -> None:
    """datatrove's overhead (local executor against the pool, in-process), then a resume after a failed write."""
    for n in (1, cores):
        local = time_prepare(shard_dir, tmp / f"work-local-{n}", n, "local")
        pool = time_prepare(shard_dir, tmp / f"work-pool-{n}", n, "pool")
        gap = local["wall_seconds"] - pool["wall_seconds"]
        phases = ", ".join(f"{k} {v.get('seconds')} s" for k, v in local["phases"].items())
        print(f"datatrove's overhead at {n} worker(s): {gap:+.2f} s = {100 * gap / local['wall_seconds']:.0f}% of "
              f"the stage (local {local['wall_seconds']:.2f} s against pool {pool['wall_seconds']:.2f} s; local "
              f"phases: {phases})")
    work = tmp / "work-resume"
    failed = time_prepare(shard_dir, work, cores, "local", fail=f"write-{len(list_shards(shard_dir)) - 1}")
    rerun = time_prepare(shard_dir, work, cores, "local")
    full = time_prepare(shard_dir, tmp / "work-full", cores, "local")["wall_seconds"]
    print(f"resume: a failed write task ({failed['wall_seconds']:.2f} s until it failed), then the rerun of the "
          f"unfinished tasks took {rerun['wall_seconds']:.2f} s against {full:.2f} s for a full run: "
          f"{full - rerun['wall_seconds']:.2f} s saved")


def jaccard_errors(contents: list[str], pairs: int = 400) -> str:
    """RMSE of the estimated against the exact Jaccard similarity for both schemes, on pairs (file, the file less a
    random share of its distinct tokens), one of them below 150 shingles for half the pairs."""
    rng = np.random.default_rng(0)
    files = [c for c in contents if len(shingles(c)) >= 10][:pairs]
    variants, exact = [], []
    for content in files:
        tokens = sorted(shingles(content))
        gone = set(rng.choice(tokens, size=int(len(tokens) * rng.uniform(0.0, 0.5)), replace=False).tolist())
        variants.append(re.sub(r"[A-Za-z_0-9]+", lambda m: "" if m.group() in gone else m.group(), content))
        exact.append(exact_jaccard(shingles(content), shingles(variants[-1])))
    out = []
    for scheme in ("oph", "permutations"):
        hasher = MinHasher(NUM_PERM, 1, 1, scheme)
        estimate = (hasher.signatures(files) == hasher.signatures(variants)).mean(axis=1)
        out.append(f"{scheme} {np.sqrt(np.mean((estimate - np.array(exact)) ** 2)):.4f}")
    return f"Jaccard estimate RMSE over {len(files)} real pairs (J 0.5-1): " + ", ".join(out)


def write_formats(shard_dir: Path, tmp: Path, formats: list[str], group_rows: int = 1000) -> dict[str, Path]:
    """The JSON Lines shards again as Parquet (row groups of `group_rows`) and Avro, shard for shard (untimed)."""
    import fastavro
    import pyarrow as pa
    import pyarrow.parquet as pq

    dirs = {"jsonl": shard_dir}
    for fmt in (f for f in formats if f != "jsonl"):
        dirs[fmt] = tmp / f"raw-{fmt}"
        dirs[fmt].mkdir()
        for shard in list_shards(shard_dir):
            records = [r for _, r in iter_shard(shard, BadRecords())]
            out = dirs[fmt] / shard.name.replace(".json.gz", f".{fmt}")
            if fmt == "parquet":
                pq.write_table(pa.Table.from_pylist(records), out, row_group_size=group_rows)
            else:
                schema = {"type": "record", "name": "row", "fields": [{"name": k, "type": ["null", "string"]}
                                                                      for k in records[0]]}
                with open(out, "wb") as fh:
                    fastavro.writer(fh, fastavro.parse_schema(schema), records, codec="deflate")
    return dirs


def read_peak_mb(path: Path) -> float:
    """Peak memory of reading one shard (tracemalloc's Python peak plus Arrow's pool)."""
    import pyarrow as pa

    pool, default = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    sum(1 for _ in iter_shard(path, BadRecords()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pa.set_memory_pool(default)
    return (peak + pool.max_memory()) / 1e6


def format_table(shard_dir: Path, tmp: Path, mb: float, formats: list[str]) -> None:
    """prepare per core (one worker, the whole command) on the same corpus in each format, then peak memory on a
    Parquet file 10x larger than the others."""
    dirs = write_formats(shard_dir, tmp, formats)
    print(f"\n{'format':10}{'MB on disk':>11}{'read s':>8}{'read MB/s':>10}{'prepare s':>10}{'MB/s/core':>10}"
          f"{'worker RSS MB':>14}{'clean/ digest':>15}")
    for fmt in formats:
        shards = list_shards(dirs[fmt])
        disk = sum(f.stat().st_size for f in shards) / 1e6
        read_s = time_read(shards)
        seconds, digest = time_command(Path(__file__).resolve().parent.parent, dirs[fmt], tmp / f"work-{fmt}", 1)
        rss = json.loads((tmp / f"work-{fmt}" / "clean" / "report.json").read_text())["peak_rss_mb"]["largest_worker"]
        print(f"{fmt:10}{disk:11.1f}{read_s:8.2f}{mb / read_s:10.1f}{seconds:10.2f}{mb / seconds:10.2f}{rss:14.0f}"
              f"{digest:>15}")
    if "parquet" in dirs:
        import pyarrow.parquet as pq

        one = list_shards(dirs["parquet"])[0]
        table = pq.read_table(one)
        big = tmp / "big" / "file-000000000000.parquet"
        big.parent.mkdir()
        with pq.ParquetWriter(big, table.schema) as writer:
            for _ in range(10):
                writer.write_table(table, row_group_size=1000)
        seconds, _ = time_command(Path(__file__).resolve().parent.parent, big.parent, tmp / "work-big", 1)
        rss = json.loads((tmp / "work-big" / "clean" / "report.json").read_text())["peak_rss_mb"]["largest_worker"]
        print(f"peak memory reading one shard: {one.stat().st_size / 1e6:.1f} MB Parquet {read_peak_mb(one):.1f} MB; "
              f"the same 10x ({big.stat().st_size / 1e6:.1f} MB, one file) {read_peak_mb(big):.1f} MB "
              f"(tracemalloc + Arrow pool); prepare on the 10x file alone: worker peak RSS {rss:.0f} MB, {seconds:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", default="work/tiny/raw", help="a directory of export shards")
    p.add_argument("--max-mb", type=float, default=40.0, help="MB of file content to benchmark on")
    p.add_argument("--no-prepare", action="store_true", help="skip timing the whole prepare stage")
    p.add_argument("--before", default=BEFORE, help="git commit of the stage as it was, timed as the baseline")
    p.add_argument("--format", default="", help="only compare input formats, e.g. jsonl,parquet,avro: prepare per "
                                                 "core on the same corpus in each, and memory on a 10x Parquet file")
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
        if args.format:
            format_table(shard_dir, Path(tmp), mb, args.format.split(","))
            print("load average after:  %.2f %.2f %.2f" % os.getloadavg())
            return 0

        read_s = time_read(shards)
        sig1, lsh1, signatures, clusters = time_ours(shards, 1)
        sigN, lshN, signatures_n, _ = time_ours(shards, cores)
        sigP, lshP, _, _ = time_ours(shards, 1, "permutations")
        assert np.array_equal(signatures, signatures_n), "signatures differ between 1 and N processes"
        ref_s = time_reference(shards)
        print("load average after:  %.2f %.2f %.2f" % os.getloadavg())

        rows = [("read only (gzip+JSON)", read_s, 1),
                ("ours, 1 process", sig1 + lsh1, 1),
                (f"ours, {cores} processes", sigN + lshN, cores),
                ("ours, classic permutations, 1 proc.", sigP + lshP, 1),
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

        print(jaccard_errors([r["content"] for f in shards[:1] for _, r in iter_shard(f, BadRecords())]))
        if not args.no_prepare:
            stage_table(shard_dir, Path(tmp), mb, cores, ref_per_core, args.before)
            overhead_and_resume(shard_dir, Path(tmp), cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
