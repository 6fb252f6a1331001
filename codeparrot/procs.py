"""Worker processes of the stages: one process pool with one start method, and workers that die with their parent.

Every pool here starts its workers with `spawn` (a fresh interpreter), never `fork`:
- the parent may hold threads (torch's intra-op pool, tokenizers' rayon pool, a tqdm monitor, accelerate's); a
  forked child inherits their locks in whatever state they were, and can deadlock on one;
- it is the start method of macOS and Windows too, so the stages behave alike everywhere.
Its price is a fresh interpreter per worker, paid once per stage: ~0.3 s, because the worker modules (corpus/shards.py,
data/pretokenize.py) do not import torch (importing torch alone takes 2-3 s on this project's machines).

A worker must not outlive its stage. Without help, a parent killed by SIGKILL (kill -9, the OOM killer) leaves its
workers blocked on the task queue forever: each holds the queue's write end itself, so none ever reads EOF, and the
multiprocessing resource tracker, which holds the same pipe as they do, stays with them. `die_with_parent` arms
Linux's parent-death signal, so the kernel kills a worker as soon as its parent dies; the tracker then reads EOF and
exits by itself.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

START_METHOD = "spawn"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_SECONDS = 1.0  # where the kernel cannot signal us: how often a watcher thread checks the parent


def _arm_parent_death_signal() -> bool:
    """Ask the Linux kernel to SIGKILL this process when its parent exits; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # the parent is gone: no cleanup could be reported to anyone


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make this process exit when its parent does (the parent is `parent_pid` when given, else the current one)."""
    # The kernel's signal follows the parent *thread* that started us; our pools start workers from the thread that
    # submits (the stage's main thread), which lives as long as the stage.
    expected = os.getppid() if parent_pid is None else parent_pid
    if not _arm_parent_death_signal():  # not Linux: a daemon thread polls the parent instead
        threading.Thread(target=_watch_parent, args=(expected,), name="die-with-parent", daemon=True).start()
    if os.getppid() != expected:  # the parent died before the signal was armed: the kernel will not send it now
        os._exit(1)


def worker_init_fn(worker_id: int) -> None:
    """A torch DataLoader `worker_init_fn`: the worker dies with the process that iterates the loader."""
    # No parent pid to compare with here; torch's own watchdog covers a parent that died before this ran.
    die_with_parent()


def _init_worker(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    # Each worker runs one task on one core; tokenizers' own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """Runs a stage's tasks in this process (`processes` <= 1) or in spawned workers that die with this process.

    `initializer(*initargs)` runs once per worker, or once here when there are no workers. Use it as a context
    manager: leaving the block joins the workers (dropping queued tasks after an error), so a stage's staged
    directory is removed only once nothing writes into it any more.
    """

    def __init__(self, processes: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()):
        self.processes = max(1, processes)
        self._executor: ProcessPoolExecutor | None = None
        if self.processes > 1:
            # An executor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool instead of hanging.
            self._executor = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context(START_METHOD),
                initializer=_init_worker, initargs=(os.getpid(), initializer, initargs))
        elif initializer is not None:
            initializer(*initargs)

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        """`fn(task)` for every task, results in task order (`fn` must be a module-level function)."""
        if self._executor is None:
            return map(fn, tasks)
        return self._executor.map(fn, tasks)

    def close(self, cancel: bool = False) -> None:
        """Join the workers, dropping the queued tasks when `cancel`; safe to call twice."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)
