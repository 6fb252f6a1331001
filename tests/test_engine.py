"""`prepare` on datatrove executors: identical to the worker-pool implementation, resumable, killable."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from codeparrot.corpus.engine import work_dir
from codeparrot.corpus.prepare import run_prepare
from codeparrot.corpus.source import BadRecords, iter_shard, list_shards, shard_size
from codeparrot.corpus.tasks import (DUPS_DTYPE, BucketsTask, WorkDir, _sorted_band_records, band_runs,
                                    largest_first)

from conftest import SUBPROCESS_ENV, write_jsonl, write_parquet

IGNORED = ("report.json", "manifest.json", "config.yaml", "lengths.png")


@pytest.fixture(scope="module")
def raw_with_near_copies(raw_export, tmp_path_factory) -> Path:
    """The fixture export plus a shard of near-copies (one comment changed) and exact copies of its largest file."""
    raw = tmp_path_factory.mktemp("engine") / "raw"
    shutil.copytree(raw_export[0], raw)
    records = [r for f in list_shards(raw) for _, r in iter_shard(f, BadRecords())]
    big = max(records, key=lambda r: len(r["content"]))
    copies = [{**big, "repo_name": f"copies/near{i}", "content": big["content"] + f"\n# copy {i}\n"} for i in range(3)]
    copies.append({**big, "repo_name": "copies/exact"})
    write_jsonl(raw / "file-000000000090.json.gz", copies)
    return raw


def artifact(clean: Path) -> dict[str, bytes]:
    """Every file of clean/ but those that record timings or paths."""
    return {str(p.relative_to(clean)): p.read_bytes() for p in sorted(clean.rglob("*"))
            if p.is_file() and p.name not in IGNORED}


def timing_free(clean: Path) -> dict:
    report = json.loads((clean / "report.json").read_text())
    drop = {"seconds", "mb_per_s", "num_proc", "peak_rss_mb"}
    out = {k: v for k, v in report.items() if k not in drop}
    out["phases"] = {k: {kk: vv for kk, vv in v.items() if kk not in drop} for k, v in report["phases"].items()}
    return out


@pytest.fixture(scope="module")
def golden(raw_with_near_copies, make_config, tmp_path_factory):
    """clean/ by the earlier worker-pool implementation (corpus.executor=pool)."""
    cfg = make_config(tmp_path_factory.mktemp("pool"), f"paths.raw={raw_with_near_copies}", "corpus.executor=pool",
                      "corpus.output_shard_records=7")
    result = run_prepare(cfg)
    assert result["near_duplicates"] >= 2 and result["exact_duplicates"] >= 1
    return cfg.paths.resolve("clean")


def test_tasks_run_largest_shard_first(raw_with_near_copies):
    assert largest_first([3, 9, 3, 5]) == [1, 3, 0, 2]  # ties keep input order
    sizes = [shard_size(f) for f in list_shards(raw_with_near_copies)]
    order = largest_first(sizes)
    assert order != list(range(len(sizes)))  # the golden tests below do run ranks on other shards than their own
    assert [sizes[i] for i in order] == sorted(sizes, reverse=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_local_executor_writes_what_the_pool_wrote(golden, raw_with_near_copies, make_config, tmp_path, workers):
    cfg = make_config(tmp_path, f"paths.raw={raw_with_near_copies}", f"corpus.num_proc={workers}",
                      "corpus.output_shard_records=7")
    result = run_prepare(cfg)
    clean = cfg.paths.resolve("clean")
    assert result["num_proc"] == workers
    assert artifact(clean) == artifact(golden)  # data shards byte for byte, clusters file included
    assert timing_free(clean) == timing_free(golden)
    assert not work_dir(cfg).exists()  # removed after success


def _plant(cfg, *tasks: str) -> None:
    flags = work_dir(cfg).with_name(work_dir(cfg).name + ".inject-failure")
    flags.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        (flags / task).touch()


def _to_run(caplog) -> dict[str, str]:
    """stage -> "k of n" from the engine's log lines of the last run."""
    found = {}
    for record in caplog.records:
        if m := re.match(r"prepare: (\w+), (\d+ of \d+) tasks to run", record.getMessage()):
            found[m.group(1)] = m.group(2)
    caplog.clear()
    return found


def test_failed_tasks_leave_clean_untouched_and_a_rerun_redoes_only_them(golden, raw_with_near_copies, make_config,
                                                                         tmp_path, caplog):
    cfg = make_config(tmp_path, f"paths.raw={raw_with_near_copies}", "corpus.num_proc=2",
                      "corpus.output_shard_records=7")
    n = len(list_shards(raw_with_near_copies))
    _plant(cfg, "scan-1", "write-0")
    caplog.set_level(logging.INFO, logger="codeparrot.corpus.engine")
    with pytest.raises(Exception, match="injected failure of scan task 1"):
        run_prepare(cfg)
    assert not cfg.paths.resolve("clean").exists() and work_dir(cfg).is_dir()
    assert _to_run(caplog)["scan"] == f"{n} of {n}"
    # the failure stopped the pool: tasks still running then have no completion marker either
    completions = work_dir(cfg) / "logs" / "scan" / "completions"
    done = len(list(completions.iterdir())) if completions.is_dir() else 0
    assert done < n and not (completions / "00001").exists()
    with pytest.raises(Exception, match="injected failure of write task 0"):
        run_prepare(cfg)
    assert not cfg.paths.resolve("clean").exists()
    ran = _to_run(caplog)
    assert ran["scan"] == f"{n - done} of {n}" and ran["cluster"] == "1 of 1" and ran["write"] == f"{n} of {n}"
    completions = work_dir(cfg) / "logs" / "write" / "completions"
    written = len(list(completions.iterdir())) if completions.is_dir() else 0
    run_prepare(cfg)
    ran = _to_run(caplog)
    assert ran["scan"] == f"0 of {n}" and ran["cluster"] == "0 of 1" and ran["write"] == f"{n - written} of {n}"
    assert artifact(cfg.paths.resolve("clean")) == artifact(golden)


def test_another_configuration_starts_the_work_dir_afresh(raw_with_near_copies, make_config, tmp_path, caplog):
    overrides = [f"paths.raw={raw_with_near_copies}", "corpus.num_proc=1"]
    cfg = make_config(tmp_path, *overrides)
    _plant(cfg, "cluster-0")
    with pytest.raises(Exception, match="injected failure of cluster task 0"):
        run_prepare(cfg)
    n = len(list_shards(raw_with_near_copies))
    caplog.set_level(logging.INFO, logger="codeparrot.corpus.engine")
    caplog.clear()
    run_prepare(make_config(tmp_path, *overrides, "corpus.line_max=900"))  # another identity: nothing reused
    assert _to_run(caplog)["scan"] == f"{n} of {n}"


def test_band_runs_rebuild_runs_from_datatrove_pairs_and_drop_exact_duplicates():
    # shard 0 has candidates 0..2, shard 1 has 0..1; survivor ids: shard 0 -> 0, 1, -1 (exact dup), shard 1 -> 2, 3
    survivor_of, first = np.array([0, 1, -1, 2, 3]), np.array([0, 3])
    # two runs of equal keys: (0:0, 0:2, 1:1) and (0:1, 1:0)
    dups = np.array([(0, 0, 0, 2), (0, 2, 1, 1), (0, 1, 1, 0)], dtype=DUPS_DTYPE)
    members, runs = band_runs(dups, survivor_of, first)
    assert members.tolist() == [0, 3, 1, 2] and runs.tolist() == [0, 0, 1, 1]
    empty = band_runs(np.zeros(0, DUPS_DTYPE), survivor_of, first)
    assert [len(a) for a in empty] == [0, 0]


@pytest.mark.parametrize("ranges", [1, 3])
def test_buckets_task_writes_the_pairs_datatrove_writes(tmp_path, ranges):
    """Our numpy merge of a band's sorted keys against datatrove's MinhashDedupBuckets on the same files: the same
    pairs, in the same order (split into key ranges or not), shard 2 holding no candidate of band 1."""
    from types import SimpleNamespace

    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.utils.hashing import HashConfig

    rng = np.random.default_rng(0)
    work = WorkDir(tmp_path / "work")
    sizes = [(40, 25), (1, 30), (17, 0), (60, 8)]  # per shard: candidates of band 0, band 1
    for shard, per_band in enumerate(sizes):
        for band, n in enumerate(per_band):
            # keys drawn from 30 values spread over the key space: runs of equal keys within and across shards
            keys = rng.choice(np.arange(30, dtype=np.uint64) << np.uint64(55), size=n)  # keys < 2**60
            path = work.bucket_sig(band, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_sorted_band_records(keys))
    task = BucketsTask(work, [f"shard-{i}" for i in range(len(sizes))], SimpleNamespace(bucket_tasks_per_band=ranges))
    for rank in range(2 * ranges):
        task(None, rank, 2 * ranges)
    config = MinhashConfig(num_buckets=2, hashes_per_bucket=1, hash_config=HashConfig(precision=64, hash_fc="sha1"))
    for rank in range(2):
        MinhashDedupBuckets(str(work.root / "sigs"), str(tmp_path / "datatrove"), config=config).run(None, rank, 2)
    for band in range(2):
        ours = b"".join(f.read_bytes() for f in sorted((work.root / "dups").glob(f"{band:05d}_*.dups")))
        theirs = (tmp_path / "datatrove" / f"{band:05d}_00.dups").read_bytes()
        assert len(ours) > 30 * DUPS_DTYPE.itemsize and ours == theirs
    assert len(list((work.root / "dups").glob("00000_*.dups"))) == ranges


def kill_9_mid_scan_then_rerun(cfg, tmp_path) -> Path:
    """`codeparrot prepare` killed (SIGKILL, the whole process group) once its first scan task completed, then run
    again; the rerun's clean/."""
    cfg.save(tmp_path / "config.yaml")
    cmd = [sys.executable, "-m", "codeparrot", "prepare", "--config", str(tmp_path / "config.yaml")]
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    completions, deadline = work_dir(cfg) / "logs" / "scan" / "completions", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if completions.is_dir() and any(completions.iterdir()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not cfg.paths.resolve("clean").exists() and completions.is_dir()
    done = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg.paths.resolve("clean")


@pytest.mark.slow
def test_kill_9_mid_scan_then_rerun_gives_the_same_clean(golden, raw_with_near_copies, tmp_path, make_config):
    cfg = make_config(tmp_path, f"paths.raw={raw_with_near_copies}", "corpus.num_proc=2",
                      "corpus.output_shard_records=7")
    assert artifact(kill_9_mid_scan_then_rerun(cfg, tmp_path)) == artifact(golden)


@pytest.fixture(scope="module")
def parquet_raw(raw_with_near_copies, tmp_path_factory) -> Path:
    """raw_with_near_copies with every shard as Parquet: the same records, in row groups of 5."""
    raw = tmp_path_factory.mktemp("engine-parquet") / "raw"
    for shard in list_shards(raw_with_near_copies):
        records = [r for _, r in iter_shard(shard, BadRecords())]
        write_parquet(raw / shard.name.replace(".json.gz", ".parquet"), records, row_group_size=5)
    return raw


def splits(clean: Path) -> dict[str, bytes]:
    """clean/'s train and valid shards (the clusters file names the input shards, so it differs by format)."""
    return {k: v for k, v in artifact(clean).items() if k.startswith(("train/", "valid/"))}


@pytest.mark.slow
def test_kill_9_mid_scan_of_parquet_shards_then_rerun_gives_the_same_clean(golden, parquet_raw, tmp_path,
                                                                           make_config):
    cfg = make_config(tmp_path, f"paths.raw={parquet_raw}", "corpus.num_proc=2", "corpus.output_shard_records=7")
    assert splits(kill_9_mid_scan_then_rerun(cfg, tmp_path)) == splits(golden)


def test_a_failed_scan_of_parquet_shards_resumes_to_the_same_clean(golden, parquet_raw, tmp_path, make_config,
                                                                   caplog):
    cfg = make_config(tmp_path, f"paths.raw={parquet_raw}", "corpus.num_proc=2", "corpus.output_shard_records=7")
    n = len(list_shards(parquet_raw))
    _plant(cfg, "scan-2")
    caplog.set_level(logging.INFO, logger="codeparrot.corpus.engine")
    with pytest.raises(Exception, match="injected failure of scan task 2"):
        run_prepare(cfg)
    assert not cfg.paths.resolve("clean").exists()
    completions = work_dir(cfg) / "logs" / "scan" / "completions"
    done = len(list(completions.iterdir())) if completions.is_dir() else 0
    run_prepare(cfg)
    assert _to_run(caplog)["scan"] == f"{n - done} of {n}"
    assert splits(cfg.paths.resolve("clean")) == splits(golden)


def fake_sbatch(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in `sbatch` on PATH that records each call (its arguments, then its script) and answers a job id;
    the folder of the records."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\nn=$(ls {calls} 2>/dev/null | wc -l)\nmkdir -p {calls}\n'
        f'{{ echo "$@"; cat "$(eval echo \\${{$#}})"; }} > {calls}/$((n + 1))\necho "Submitted batch job $((1000 + n))"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def submitted(calls: Path) -> list[str]:
    """The sbatch calls fake_sbatch recorded, in order."""
    return [p.read_text() for p in sorted(calls.iterdir(), key=lambda p: int(p.name))]


def test_slurm_submits_the_chain_of_dependent_job_arrays(raw_with_near_copies, make_config, tmp_path, monkeypatch):
    """The real SlurmPipelineExecutor against a stand-in `sbatch` that records each script and answers a job id."""
    from codeparrot.corpus.engine import SubmittedToSlurm

    calls = fake_sbatch(tmp_path, monkeypatch)
    cfg = make_config(tmp_path, f"paths.raw={raw_with_near_copies}", "corpus.executor=slurm",
                      "corpus.slurm_partition=cpu", "corpus.slurm_time=01:00:00", "corpus.num_proc=3")
    with pytest.raises(SubmittedToSlurm, match="run the same `codeparrot prepare` again"):
        run_prepare(cfg)
    assert not cfg.paths.resolve("clean").exists()
    scripts = submitted(calls)
    arrays = [s for s in scripts if "RUN_OFFSET" in s.splitlines()[0]]  # each stage's tasks (others merge stats)
    names = [re.search(r"--job-name=(\S+)", s).group(1) for s in arrays]
    assert names == ["prepare-scan", "prepare-buckets", "prepare-cluster", "prepare-write"]
    n = len(list_shards(raw_with_near_copies))
    assert f"--array=0-{n - 1}" in arrays[0] and f"--array=0-{n - 1}" in arrays[3] and "--partition=cpu" in arrays[0]
    assert "--time=01:00:00" in arrays[0] and "--dependency" not in arrays[0].splitlines()[0]
    ids = {s: 1000 + i for i, s in enumerate(scripts)}
    for before, after in zip(arrays, arrays[1:]):  # each stage waits for the one before it to succeed
        assert f"--dependency=afterok:{ids[before]}" in after.splitlines()[0]


def test_slurm_cluster_task_gets_its_memory_and_dependents_die_with_a_failed_dependency(
        raw_with_near_copies, make_config, tmp_path, monkeypatch):
    """The cluster task asks for corpus.slurm_cluster_mem_gb (spread over its CPUs), the other stages for
    slurm_mem_per_cpu_gb; and every job is killed, not left pending forever, when a job it waits for fails."""
    from codeparrot.corpus.engine import SubmittedToSlurm

    calls = fake_sbatch(tmp_path, monkeypatch)
    cfg = make_config(tmp_path, f"paths.raw={raw_with_near_copies}", "corpus.executor=slurm",
                      "corpus.slurm_partition=cpu", "corpus.slurm_cpus_per_task=2", "corpus.slurm_mem_per_cpu_gb=3",
                      "corpus.slurm_cluster_mem_gb=64")
    with pytest.raises(SubmittedToSlurm):
        run_prepare(cfg)
    scripts = submitted(calls)
    arrays = [s for s in scripts if "RUN_OFFSET" in s.splitlines()[0]]
    memory = {re.search(r"--job-name=(\S+)", s).group(1): re.search(r"--mem-per-cpu=(\S+)", s).group(1)
              for s in arrays}
    assert memory == {"prepare-scan": "3G", "prepare-buckets": "3G", "prepare-cluster": "32G", "prepare-write": "3G"}
    dependent = [s for s in scripts if "--dependency" in s]  # all but the scan: later stages, merge-stats jobs
    assert len(dependent) == len(scripts) - 1
    assert all("#SBATCH --kill-on-invalid-dep=yes" in s for s in dependent)


def test_cluster_task_memory_follows_the_file_count(make_config, tmp_path):
    """Derived: 124 B/file (the measured peak) x 2, at least 4 GB; files counted from the scan's digests where a
    shard is scanned, else guessed from the listing's compressed bytes."""
    from codeparrot.corpus.engine import GUESSED_INPUT_BYTES_PER_FILE, cluster_mem_gb, count_files

    cfg = make_config(tmp_path)
    assert cluster_mem_gb(cfg, 70_000_000) == 17  # 124 x 70M x 2 B = 16.2 GiB: the scan's 4 GB would not do
    assert cluster_mem_gb(cfg, 1000) == 4
    cfg.corpus.slurm_mem_per_cpu_gb, cfg.corpus.slurm_cpus_per_task = 8, 2
    assert cluster_mem_gb(cfg, 1000) == 16  # never less than the other stages' tasks get
    cfg.corpus.slurm_cluster_mem_gb = 6
    assert cluster_mem_gb(cfg, 70_000_000) == 6  # set: taken as it is
    work = WorkDir(tmp_path / "work")
    sizes = [10 * GUESSED_INPUT_BYTES_PER_FILE, 20 * GUESSED_INPUT_BYTES_PER_FILE]
    assert count_files(work, sizes) == 30  # nothing scanned yet
    (work.root / "digests").mkdir(parents=True)
    np.save(work.shard("digests", 1, ".npy"), np.zeros((7, 2), "<u8"))
    assert count_files(work, sizes) == 10 + 7  # shard 1 scanned: its records, counted
    np.save(work.shard("digests", 0, ".npy"), np.zeros((0, 2), "<u8"))
    assert count_files(work, sizes) == 7  # shard 0 scanned too: every record bad


@pytest.mark.slow
def test_ray_executor_writes_what_the_pool_wrote(golden, raw_with_near_copies, make_config, tmp_path):
    import ray  # in the dev extra

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = make_config(tmp_path, f"paths.raw={raw_with_near_copies}", "corpus.executor=ray", "corpus.num_proc=2",
                          "corpus.output_shard_records=7")
        run_prepare(cfg)
    finally:
        ray.shutdown()
    assert artifact(cfg.paths.resolve("clean")) == artifact(golden)
    assert timing_free(cfg.paths.resolve("clean")) == timing_free(golden)


@pytest.mark.slow
def test_cluster_task_memory_per_file_with_signatures_on_disk(make_config, tmp_path):
    """The one task that sees the whole corpus holds tens of bytes per file in RAM (tracemalloc's peak, numpy
    buffers included): signatures stay memory-mapped on disk, scans are read one shard at a time."""
    import tracemalloc

    from codeparrot.corpus.engine import make_executor, open_work_dir, run_stage, stage_steps
    from codeparrot.corpus.prepare import _settings

    rng, n_shards, per_shard = np.random.default_rng(3), 40, 500
    words = [f"name{i}" for i in range(4000)]
    raw = tmp_path / "raw"
    for s in range(n_shards):  # distinct small files; every 50th a near-copy of the one before it
        records = []
        for i in range(per_shard):
            body = " ".join(rng.choice(words, 40))
            if i % 50 == 1:
                body = records[-1]["content"][:-6] + " tail"
            records.append({"repo_name": f"r{s}/{i}", "path": "a.py", "copies": "1", "size": "1",
                            "content": body, "license": "mit"})
        write_jsonl(raw / f"file-{s:012d}.json.gz", records)
    cfg = make_config(tmp_path, f"paths.raw={raw}", "corpus.filters=[]", "corpus.num_proc=2")
    files = [str(f) for f in list_shards(raw)]
    work = open_work_dir(work_dir(cfg), {"test": 1})
    steps = stage_steps(cfg, work, files, _settings(cfg.corpus))
    for stage, step, tasks in steps[:2]:  # scan and buckets, on the executor
        run_stage(cfg, work, stage, make_executor(cfg, work, stage, step, tasks, 2), tasks)
    stage, cluster, _ = steps[2]
    assert stage == "cluster"
    tracemalloc.start()
    cluster(None, 0, 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    import pickle

    survey, near = pickle.loads((work.root / "cluster" / "survey.pkl").read_bytes())
    n = n_shards * per_shard
    assert survey.files_in == n and len(near.clusters) >= n // 50 * 0.9  # the planted near-copies were found
    assert near.signature_mb >= n * cfg.corpus.minhash_num_perm * 4 / 1e6 * 0.9  # on disk, not in the peak
    print(f"cluster task: {peak / n:.0f} B/file peak")
    assert peak / n < 200, peak / n  # 233 B/file with a set of every digest; 124 now (a fixed share at 20k)
