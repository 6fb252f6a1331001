"""Running prepare's tasks (tasks.py) on a datatrove executor: local processes, a Slurm cluster or a Ray cluster.

The work dir (corpus.work_dir, default `<clean>.work` beside clean/) holds every task's output and datatrove's
`completions/` markers per stage, so a rerun after a crash or a kill redoes only the unfinished tasks. It belongs to
one identity of the stage (config and inputs): another identity wipes it, and a success removes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..config import Config, ConfigError
from ..logs import progress_bar
from .shards import Settings

if TYPE_CHECKING:  # tasks.py imports datatrove, which the command line need not load to start
    from .survey import NearDups, Survey, Written
    from .tasks import WorkDir

log = logging.getLogger(__name__)
IDENTITY = "identity.json"
CLUSTER_BYTES_PER_FILE = 124  # the cluster task's peak per input file (tests/test_engine.py, docs/stages.md's Limits)
CLUSTER_MEM_SAFETY = 2  # what the measurement leaves out: allocator slack, a corpus unlike the test's
GUESSED_INPUT_BYTES_PER_FILE = 1024  # gzip'd JSON per file before the scan counts them: ~2 KB measured, erring large
MIN_CLUSTER_MEM_GB = 4  # what every task got before: a small corpus asks no less


def work_dir(cfg: Config) -> Path:
    """Where the tasks write: corpus.work_dir, or `<clean>.work` beside clean/."""
    clean = cfg.paths.resolve("clean")
    return Path(cfg.corpus.work_dir) if cfg.corpus.work_dir else clean.with_name(clean.name + ".work")


def open_work_dir(root: Path, identity: dict[str, Any]) -> WorkDir:
    """The work dir of this identity: kept (resume) when it matches, emptied when it belongs to another one."""
    from .tasks import WorkDir

    marker = root / IDENTITY
    if root.exists():
        try:
            same = json.loads(marker.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("prepare: %s holds another configuration's tasks; starting afresh", root)
            shutil.rmtree(root)
    if not root.exists():
        root.mkdir(parents=True)
        marker.write_text(json.dumps(identity, sort_keys=True, default=str) + "\n")
    return WorkDir(root)


def _manager_servers_die_with_parent() -> None:
    """LocalPipelineExecutor.run starts a multiprocess Manager server per stage, which outlives a killed stage:
    make each one die with the process that started it (the kernel's parent-death signal, procs.die_with_parent)."""
    from multiprocess.managers import BaseManager

    from ..procs import die_with_parent

    original = BaseManager._run_server.__func__
    if getattr(original, "dies_with_parent", False):
        return

    def run_server(cls, *args, **kwargs):
        die_with_parent()
        return original(cls, *args, **kwargs)

    run_server.dies_with_parent = True
    BaseManager._run_server = classmethod(run_server)


def start_local_workers(cfg: Config, workers: int, preload: str = "codeparrot.corpus.tasks") -> None:
    """Start the server that local workers fork from, if there will be any: it imports `preload` (our tasks,
    numpy, datatrove) once, on another core while this process does its own start, and each stage's pool then
    starts in milliseconds instead of re-importing them in every worker. Idempotent."""
    if cfg.corpus.executor != "local" or workers < 2:
        return
    import multiprocess
    from multiprocess import forkserver

    multiprocess.get_context("forkserver").set_forkserver_preload([preload])
    forkserver.ensure_running()  # returns at once: the server imports while we go on


def make_executor(cfg: Config, work: WorkDir, stage: str, step: Any, tasks: int, workers: int, depends=None,
                  job: str = "prepare", preload: str = "codeparrot.corpus.tasks", mem_gb: int | None = None):
    """The datatrove executor of one stage of `job` on corpus.executor; `preload` is the module of its task;
    `mem_gb`: each task's memory on Slurm (None: corpus.slurm_mem_per_cpu_gb per CPU)."""
    c, logs = cfg.corpus, str(work.root / "logs" / stage)
    if c.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        start_local_workers(cfg, workers, preload)
        _manager_servers_die_with_parent()
        return LocalPipelineExecutor(pipeline=[step], tasks=tasks, workers=max(1, min(workers, tasks)),
                                     logging_dir=logs)
    if c.executor == "ray":
        import ray
        from datatrove.executor.ray import RayPipelineExecutor

        if not ray.is_initialized():
            ray.init(address=c.ray_address or None)
        return RayPipelineExecutor(pipeline=[step], tasks=tasks, workers=workers, logging_dir=logs,
                                   cpus_per_task=1)
    if c.executor == "slurm":
        from datatrove.executor.slurm import SlurmPipelineExecutor

        if not c.slurm_partition:
            raise ConfigError(f"corpus.executor=slurm needs corpus.slurm_partition (for {job})")
        cpus = c.slurm_cpus_per_task
        mem_per_cpu = c.slurm_mem_per_cpu_gb if mem_gb is None else math.ceil(mem_gb / cpus)  # sbatch: per CPU only
        # A job whose dependency failed would otherwise pend forever (DependencyNeverSatisfied): kill it instead.
        return SlurmPipelineExecutor(pipeline=[step], tasks=tasks, time=c.slurm_time, partition=c.slurm_partition,
                                     cpus_per_task=cpus, mem_per_cpu_gb=mem_per_cpu,
                                     sbatch_args={"kill-on-invalid-dep": "yes"},
                                     job_name=f"{job}-{stage}", logging_dir=logs, depends=depends,
                                     venv_path=os.path.join(sys.prefix, "bin", "activate"))
    raise ConfigError(f"corpus.executor={c.executor!r} has no datatrove executor")


def stage_steps(cfg: Config, work: WorkDir, files: list[str], settings: Settings, sizes: list[int] | None = None
                ) -> list[tuple[str, Any, int]]:
    """(stage, its pipeline step, its task count), in order; no buckets without near-dedup. `sizes`: the files'
    bytes, when the caller has them."""
    from .source import shard_size
    from .tasks import BucketsTask, ClusterTask, ScanTask, WriteTask, band_count, bucket_tasks_per_band, largest_first

    # Sizes are part of the inputs' fingerprint, so a resumed run (same identity) maps ranks to the same shards.
    order = largest_first([shard_size(f) for f in files] if sizes is None else sizes)
    steps = [("scan", ScanTask(work, files, settings, order), len(files))]
    if cfg.corpus.near_dedup:  # a task per band and key range
        tasks = band_count(cfg.corpus) * bucket_tasks_per_band(cfg.corpus)
        steps.append(("buckets", BucketsTask(work, files, settings.corpus), tasks))
    steps.append(("cluster", ClusterTask(work, files, settings, cfg.corpus.max_bad_ratio), 1))
    steps.append(("write", WriteTask(work, files, settings, order), len(files)))
    return steps


def count_files(work: WorkDir, sizes: list[int]) -> int:
    """Files in the input: a scanned shard's counted (its digests' rows), another's guessed from its bytes."""
    import numpy as np

    total = 0
    for index, size in enumerate(sizes):
        digests = work.shard("digests", index, ".npy")
        if digests.is_file():  # written whole (atomic_write): reading its header is enough
            total += np.load(digests, mmap_mode="r").shape[0]
        else:
            total += math.ceil(size / GUESSED_INPUT_BYTES_PER_FILE)
    return total


def cluster_mem_gb(cfg: Config, files: int) -> int:
    """The cluster task's memory on Slurm: corpus.slurm_cluster_mem_gb, or derived from the input's file count."""
    c = cfg.corpus
    if c.slurm_cluster_mem_gb is not None:
        if c.slurm_cluster_mem_gb < 1:
            raise ConfigError(f"corpus.slurm_cluster_mem_gb={c.slurm_cluster_mem_gb}: give at least 1 (GB), or null")
        return c.slurm_cluster_mem_gb
    need = math.ceil(CLUSTER_MEM_SAFETY * CLUSTER_BYTES_PER_FILE * files / 2 ** 30)  # Slurm's G is GiB
    return max(MIN_CLUSTER_MEM_GB, need, c.slurm_cpus_per_task * c.slurm_mem_per_cpu_gb)


def stage_mem_gb(cfg: Config, work: WorkDir, stage: str, sizes: list[int]) -> int | None:
    """Each task's memory of `stage` on Slurm; None: corpus.slurm_mem_per_cpu_gb per CPU, which the one task that
    holds the whole corpus (cluster) outgrows: killed there, after the whole scan, the chain could not finish."""
    if cfg.corpus.executor != "slurm" or stage != "cluster":
        return None
    files = count_files(work, sizes)
    mem = cluster_mem_gb(cfg, files)
    log.info("prepare: the cluster task asks Slurm for %d GB (%d input files, counted or guessed)", mem, files)
    return mem


@contextlib.contextmanager
def watch_completions(directory: Path, stage: str, tasks: int, done: int) -> Iterator[None]:
    """A progress bar of a stage's tasks while it runs: its completion markers, counted twice a second."""
    bar = progress_bar(tasks, desc=f"prepare: {stage}", unit="task")
    bar.update(done)
    stop = threading.Event()

    def follow() -> None:
        shown = done
        while not stop.wait(0.5):
            now = len(os.listdir(directory)) if directory.is_dir() else 0
            bar.update(now - shown)
            shown = now

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def incomplete(executor) -> int:
    """Tasks of a stage without a completion marker."""
    return len(executor.get_incomplete_ranks(skip_completed=True))


def run_stage(cfg: Config, work: WorkDir, stage: str, executor, tasks: int, job: str = "prepare") -> bool:
    """Run one stage's unfinished tasks (with a progress bar); True when some were queued on Slurm, not run."""
    todo = incomplete(executor)
    log.info("%s: %s, %d of %d tasks to run on %s", job, stage, todo, tasks, cfg.corpus.executor)
    if todo:
        with watch_completions(work.root / "logs" / stage / "completions", f"{job}: {stage}", tasks, tasks - todo):
            executor.run()
    if cfg.corpus.executor == "slurm":  # queued, not run: later stages wait on it as a dependency
        return bool(todo)
    if incomplete(executor):
        raise RuntimeError(f"{job}: {incomplete(executor)} {stage} task(s) did not complete; see "
                           f"{work.root / 'logs' / stage / 'logs'}; rerun to resume")
    return False


def run_stages(cfg: Config, work: WorkDir, files: list[str], settings: Settings, workers: int
               ) -> tuple[Survey, NearDups, Written, dict[str, float]]:
    """Every stage in order, each resuming at its unfinished tasks; what the tasks found, and seconds per stage."""
    from .source import shard_size

    seconds: dict[str, float] = {}
    submitted = None  # on Slurm: the last stage queued, which the next one depends on
    sizes = [shard_size(f) for f in files]  # once: a remote shard's size is a request
    for stage, step, tasks in stage_steps(cfg, work, files, settings, sizes):
        executor = make_executor(cfg, work, stage, step, tasks, workers, depends=submitted,
                                 mem_gb=stage_mem_gb(cfg, work, stage, sizes))
        start = time.perf_counter()
        if run_stage(cfg, work, stage, executor, tasks):
            submitted = executor
        seconds[stage] = time.perf_counter() - start
    if submitted is not None:
        raise SubmittedToSlurm(work.root)
    import pickle

    from .tasks import written_result

    survey, near = pickle.loads((work.root / "cluster" / "survey.pkl").read_bytes())
    written = written_result(work, len(files))
    return survey, near, written, seconds


class SubmittedToSlurm(RuntimeError):
    """The job chain is queued; the same command again, once it has finished, writes the artifact from the work
    dir."""

    def __init__(self, root: Path, job: str = "prepare", chain: str = "scan -> buckets -> cluster -> write",
                 artifact: str = "clean/") -> None:
        super().__init__(f"{job}: the {chain} job chain is submitted to Slurm (logs under {root / 'logs'}); once it "
                         f"has finished, run the same `codeparrot {job}` again: it finds every task complete and "
                         f"writes {artifact}")


