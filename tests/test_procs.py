"""Worker processes: the pool keeps task order and sets its workers up; no worker outlives a killed stage."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from codeparrot.corpus.source import ShardWriter
from codeparrot.procs import START_METHOD, WorkerPool

from conftest import STDLIB

REPO = Path(__file__).resolve().parents[1]
PR_GET_PDEATHSIG = 2


def _facts(x: int) -> dict:
    """What a task sees of its process (a module-level function, so spawned workers can import it)."""
    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
    return {"x2": 2 * x, "pid": os.getpid(), "ppid": os.getppid(), "pdeathsig": sig.value,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"), "init": _INIT.get("value")}


_INIT: dict = {}


def _init(value: str) -> None:
    _INIT["value"] = value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_pool_keeps_order_and_arms_each_worker():
    assert START_METHOD == "spawn"
    with WorkerPool(2, _init, ("set",)) as pool:
        facts = list(pool.map(_facts, range(12)))
    assert [f["x2"] for f in facts] == [2 * x for x in range(12)]
    assert {f["ppid"] for f in facts} == {os.getpid()} and os.getpid() not in {f["pid"] for f in facts}
    assert all(f["pdeathsig"] == signal.SIGKILL and f["tokenizers_parallelism"] == "false" for f in facts)
    assert {f["init"] for f in facts} == {"set"}
    _INIT.clear()
    with WorkerPool(1, _init, ("here",)) as pool:  # no workers: the tasks and the initializer run here
        assert [f["pid"] for f in pool.map(_facts, [1])] == [os.getpid()] and _INIT["value"] == "here"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _descendants(pid: int) -> set[int]:
    """Children, grandchildren... of `pid` (every thread's children list)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += sorted(kids - found)
            found |= kids
    return found


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_and_check_orphans(proc: subprocess.Popen, min_descendants: int, timeout: float = 60) -> dict[int, str]:
    """Once `proc` has that many descendants, SIGKILL it alone; all of them must be gone within 3 s.

    Returns the descendants' command lines, read before the kill."""
    def enough() -> set[int] | None:
        found = _descendants(proc.pid)
        return found if len(found) >= min_descendants else None

    kids = _wait_for(enough, timeout, f"{min_descendants} worker processes of {proc.args}")
    time.sleep(0.3)  # let them get to work
    kids |= _descendants(proc.pid)
    commands = {k: _command(k) for k in kids}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    try:
        _wait_for(lambda: not any(_alive(k) for k in kids), 3.0, "the orphans to die")
    finally:
        for k in kids:  # a failure must not leave them behind either
            if _alive(k):
                os.kill(k, signal.SIGKILL)
    return commands


def test_a_worker_dies_when_its_parent_exits():
    grandchild = textwrap.dedent("""
        import os, sys, time
        from codeparrot.procs import die_with_parent
        die_with_parent(int(sys.argv[1]))
        print(os.getpid(), flush=True)
        time.sleep(60)
    """)
    child = textwrap.dedent(f"""
        import os, subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", {grandchild!r}, str(os.getpid())], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        print(p.stdout.readline().strip(), flush=True)  # armed; now exit without waiting for it
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, cwd=REPO)
    pid = int(out.stdout.strip())
    _wait_for(lambda: not _alive(pid), 3.0, "the grandchild to die with its parent")
    # A parent that is already gone when the signal is armed: the worker exits at once.
    late = subprocess.run([sys.executable, "-c", "from codeparrot.procs import die_with_parent; "
                           "die_with_parent(1); print('survived')"], capture_output=True, text=True, timeout=60)
    assert late.returncode == 1 and "survived" not in late.stdout


def _big_raw(directory: Path, mb: float) -> Path:
    """Export-format shards of real stdlib files, repeated with a marker line up to `mb` of content."""
    files = [p for p in sorted(STDLIB.glob("*.py")) if 2000 < p.stat().st_size < 40000][:200]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    size, i = 0, 0
    with ShardWriter(directory, 400, compresslevel=1) as writer:
        while size < mb * 1e6:
            text = f"# copy {i}\n" + texts[i % len(texts)]
            writer.write({"repo_name": f"r/{i % 97}", "path": f"f{i}.py", "content": text})
            size, i = size + len(text), i + 1
    return directory


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_prepare_leaves_no_process_behind(tmp_path):
    raw = _big_raw(tmp_path / "raw", mb=40)
    cmd = [sys.executable, "-m", "codeparrot", "prepare", f"paths.workdir={tmp_path}", f"paths.raw={raw}",
           "corpus.num_proc=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        commands = _kill_and_check_orphans(proc, min_descendants=3)  # two workers and the resource tracker
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "clean").exists()
    # The tracker holds the workers' pipe: it reads EOF, and exits, once they are dead.
    assert any("resource_tracker" in cmd for cmd in commands.values()), commands


LOADER = textwrap.dedent("""
    import time
    import torch
    from torch.utils.data import IterableDataset
    from codeparrot.data.packing import make_dataloader

    class Slow(IterableDataset):
        def __iter__(self):
            yield torch.zeros(4, dtype=torch.long)
            time.sleep(300)  # busy in the dataset: torch's own watchdog would not notice the parent's death
            yield torch.zeros(4, dtype=torch.long)

    loader = make_dataloader(Slow(), batch_size=1, num_workers=2)
    next(iter(loader))
    print("ready", flush=True)
    time.sleep(300)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_dataloader_leaves_no_worker_behind():
    proc = subprocess.Popen([sys.executable, "-c", LOADER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _kill_and_check_orphans(proc, min_descendants=2)
    finally:
        if proc.poll() is None:
            proc.kill()

