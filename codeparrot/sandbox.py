"""Run untrusted (model-written) programs one at a time, isolated: no network, no write outside a private tmpfs, limits.

Mechanism "namespaces" (as root, util-linux only): `unshare --mount --net --pid --fork --kill-child --mount-proc` runs a
root shell as pid 1 of a new pid namespace. It mounts a private tmpfs over /tmp (the program's cwd), covers the other
world-writable dirs, remounts / read-only, then runs `prlimit ... setpriv --reuid=<random uid> python prog.py` as its
child. The shell stays root and pid 1 on purpose: setpriv's uid change would clear the parent-death signal that
--kill-child arms, and when pid 1 exits the kernel kills everything left in the namespace (daemons included).
stdout/stderr go to files on a tmpfs of `output_bytes`, so a flood gets ENOSPC at once (a pipe would keep it running);
the shell copies them to the host after the program exits. Mechanism "bubblewrap" is for non-root users.
A pass needs exit code 0 *and* a random marker printed after the checks, so `sys.exit(0)` before them fails.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("unshare", "setpriv", "prlimit")
WRITABLE_DIRS = ("/var/tmp", "/run/lock", "/dev/shm", "/dev/mqueue")  # world-writable on Debian: covered, read-only
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


class SandboxUnavailable(RuntimeError):
    """No mechanism isolates untrusted code on this machine; the message names what is missing."""


@dataclass
class SandboxLimits:
    """Resource limits of one sandboxed program."""
    cpu_seconds: int = 10
    wall_seconds: float = 15.0
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 64
    output_bytes: int = 64 << 10


@dataclass
class Result:
    """Outcome of one program: passed only with exit code 0 and the marker in stdout."""
    passed: bool
    status: str  # "passed", "failed", "timed out", "killed", "no marker"
    detail: str
    seconds: float
    stdout: str = ""


def check_program(prompt: str, completion: str, test: str, entry_point: str, marker: str) -> str:
    """The HumanEval program: the completed function, its tests, then the marker that proves the checks ran."""
    return prompt + completion + "\n" + test + f"\ncheck({entry_point})\nprint({marker!r})\n"


def detect_mechanism() -> str:
    """The strongest mechanism available: "namespaces" (root + util-linux), "bubblewrap" (non-root), else "none"."""
    if os.geteuid() == 0 and all(shutil.which(t) for t in TOOLS):
        return "namespaces"
    if os.geteuid() != 0 and shutil.which("bwrap") and shutil.which("prlimit"):
        return "bubblewrap"
    return "none"


def _prlimit(limits: SandboxLimits) -> list[str]:
    """prlimit arguments; RLIMIT_NPROC counts per uid, hence the non-root random uid it is paired with."""
    # CPU: the soft limit sends SIGXCPU ("timed out"); the hard one, 1 s later, SIGKILLs a program that catches it
    return ["prlimit", f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}", f"--as={limits.memory_bytes}",
            "--core=0", f"--fsize={limits.file_size_bytes}", f"--nofile={limits.open_files}",
            f"--nproc={limits.processes}", "--"]


def _hidden_ancestor(path: str) -> str | None:
    """The highest ancestor of `path` that other users cannot traverse (e.g. /root holding pyenv), if any."""
    parts = Path(path).parents
    for p in reversed(parts):
        if str(p) != "/" and not os.stat(p).st_mode & stat.S_IXOTH:
            return str(p)
    return None


def _namespace_command(host_dir: str, limits: SandboxLimits) -> list[str]:
    """unshare + the pid-1 root shell that builds the filesystem view and runs the program as a random uid."""
    uid = 200000 + secrets.randbelow(800000)  # a fresh uid per run: NPROC then counts this run's processes only
    q = shlex.quote
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    setup = [f"exec 5<{q(host_dir)}/prog.py",  # opened before /tmp (which holds host_dir) is covered
             f"mount -t tmpfs -o size={limits.file_size_bytes},mode=0700,uid={uid},gid={uid} sandbox /tmp",
             f"mkdir -m 0700 /tmp/.out && mount -t tmpfs -o size={2 * limits.output_bytes},mode=0700 out /tmp/.out"]
    hidden = _hidden_ancestor(prefix)
    if hidden:  # the interpreter lives under a dir the uid cannot enter: cover that dir, bind the prefix back
        setup += ["mkdir /tmp/.hold", f"mount --bind {q(prefix)} /tmp/.hold",
                  f"mount -t tmpfs -o size=1m,mode=0755 hidden {q(hidden)}", f"mkdir -p {q(prefix)}",
                  f"mount --bind /tmp/.hold {q(prefix)}", "umount /tmp/.hold", "rmdir /tmp/.hold",
                  f"mount -o remount,bind,ro {q(prefix)}"]
    setup += [f"[ ! -d {d} ] || mount -t tmpfs -o size=64k,mode=0755 ro {d}" for d in WRITABLE_DIRS]
    setup += ["mount -o remount,bind,ro /", "cat <&5 >/tmp/prog.py", "exec 5<&-", f"chown {uid} /tmp/prog.py",
              "cd /tmp"]
    run = _prlimit(limits) + ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                              "--bounding-set=-all", "--no-new-privs", "--", python, "-I", "-B", "prog.py"]
    n = limits.output_bytes
    script = "set -e\n" + "\n".join(setup) + "\nset +e\n" + shlex.join(run) + \
        " </dev/null >/tmp/.out/stdout 2>/tmp/.out/stderr\nrc=$?\n" + \
        f"head -c {n} /tmp/.out/stdout\nhead -c {n} /tmp/.out/stderr >&2\nexit $rc\n"  # shell fds 1, 2: host files
    return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "--", "/bin/sh", "-c", script]


def _bubblewrap_command(host_dir: str, limits: SandboxLimits) -> list[str]:
    """bwrap for a non-root user: read-only /, private /tmp, no network; stdout bounded by RLIMIT_FSIZE (untested)."""
    return _prlimit(limits) + ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
                               "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp",
                               "--ro-bind", f"{host_dir}/prog.py", "/tmp/prog.py", "--chdir", "/tmp", "--",
                               os.path.realpath(sys.executable), "-I", "-B", "prog.py"]


def _set_limits(limits: SandboxLimits) -> None:
    """The prlimit limits, set in the child before it runs the program (the unsandboxed mode's only guard)."""
    import resource

    for which, value in ((resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1)),
                         (resource.RLIMIT_AS, (limits.memory_bytes,) * 2), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_FSIZE, (limits.file_size_bytes,) * 2),
                         (resource.RLIMIT_NOFILE, (limits.open_files,) * 2)):
        resource.setrlimit(which, value)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL unshare and its pid-1 child (the kernel then kills the whole pid namespace); wait until it is gone."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in [proc.pid, *map(int, children)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 5
    for pid in map(int, children):  # pid 1 exits only after every process of its namespace is dead
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and \
                ") Z" not in Path(f"/proc/{pid}/stat").read_text(errors="replace"):
            time.sleep(0.005)


def _status(rc: int, timed_out: bool, stdout: str, stderr: str, marker: str | None) -> tuple[str, str]:
    """Map the exit code (128 + signal from the shell) and output to a status and a one-line reason."""
    last = (stderr.strip().splitlines() or [""])[-1][:200]
    if timed_out:
        return "timed out", "wall-clock limit"
    if rc == 128 + signal.SIGXCPU:
        return "timed out", "CPU limit"
    if rc > 128:
        return "killed", f"signal {signal.Signals(rc - 128).name}" if rc - 128 < signal.NSIG else f"exit {rc}"
    if rc != 0:
        return "failed", last or f"exit {rc}"
    if marker is not None and marker not in stdout:
        return "no marker", "exited 0 before the checks finished"
    return "passed", ""


def run_program(source: str, limits: SandboxLimits, mechanism: str, marker: str | None = None) -> Result:
    """Run `source` isolated; it passes with exit code 0 and `marker` (when given) in its stdout."""
    if mechanism not in ("namespaces", "bubblewrap", "unsandboxed"):
        raise SandboxUnavailable(f"no sandbox mechanism ({mechanism!r}): need root with {', '.join(TOOLS)}, or bwrap")
    host_dir = tempfile.mkdtemp(prefix="codeparrot-sandbox-")  # 0700, root's: the sandboxed uid cannot see it
    start = time.monotonic()
    try:
        Path(host_dir, "prog.py").write_text(source)
        with open(Path(host_dir, "stdout"), "w+b") as out, open(Path(host_dir, "stderr"), "w+b") as err:
            preexec = None
            if mechanism == "namespaces":
                cmd = _namespace_command(host_dir, limits)
            elif mechanism == "bubblewrap":
                os.chmod(host_dir, 0o755)
                cmd = _bubblewrap_command(host_dir, limits)
            else:  # only limits and a temp cwd: the caller was told, and allowed it
                cmd, preexec = [os.path.realpath(sys.executable), "-I", "-B", "prog.py"], lambda: _set_limits(limits)
            proc = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=host_dir,
                                    start_new_session=True, preexec_fn=preexec)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out, rc = True, -9
            _kill_tree(proc)  # also after a normal exit: nothing may outlive the run
            if mechanism == "unsandboxed":  # no pid namespace: kill what is left of its session's process group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            out.seek(0)
            err.seek(0)
            stdout = out.read(limits.output_bytes).decode(errors="replace")
            stderr = err.read(limits.output_bytes).decode(errors="replace")
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
    status, detail = _status(rc, timed_out, stdout, stderr, marker)
    return Result(status == "passed", status, detail, time.monotonic() - start, stdout)


def self_test(mechanism: str) -> None:
    """Prove isolation: a loopback connection and a write to a world-writable dir outside must both fail."""
    outside = tempfile.mkdtemp(prefix="codeparrot-selftest-")
    os.chmod(outside, 0o777)  # writable by anyone: only the sandbox's own mounts can stop the write
    target = Path(outside, "escaped")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0)
        port = listener.getsockname()[1]
        marker = secrets.token_hex(16)
        probe = (f"import socket\nescaped = []\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                 f"    escaped.append('network')\nexcept OSError:\n    pass\ntry:\n"
                 f"    open({str(target)!r}, 'w').write('x')\n    escaped.append('filesystem')\nexcept OSError:\n"
                 f"    pass\nprint(escaped or {marker!r})\n")
        try:
            result = run_program(probe, SandboxLimits(wall_seconds=10), mechanism, marker)
            try:
                listener.accept()[0].close()
                connected = True
            except BlockingIOError:
                connected = False
        finally:
            escaped_fs = target.exists()
            shutil.rmtree(outside, ignore_errors=True)
    missing = [name for name, bad in (("network isolation", connected), ("filesystem isolation", escaped_fs)) if bad]
    if missing or not result.passed:
        raise SandboxUnavailable(f"sandbox {mechanism!r} failed its self-test: "
                                 f"{', '.join(missing) or result.status + ': ' + result.detail + result.stdout[:200]}")
