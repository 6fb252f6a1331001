"""Run untrusted (model-written) programs one at a time, isolated: no network, nothing writable outside a private tmpfs.

One mechanism, bubblewrap (`bwrap`, Flatpak's sandbox). Each program gets a NEW ROOT that holds only the mounts of
`mount_plan()`: read-only binds of `/usr`, the interpreter's prefix and two `/etc` files, its own `/proc`, a minimal
`/dev` and a size-capped tmpfs `/tmp` (its cwd), then `/` itself is remounted read-only. Nothing else of the host is
there: no other mount to write to, no Unix socket of the host to connect to. It runs in new mount, pid, net, ipc and
uts namespaces, with no capabilities, under a uid of its own: as root, bwrap keeps only CAP_SETUID/SETGID/SETPCAP so
that `setpriv` can drop to a random uid (RLIMIT_NPROC then counts this run's processes only); as a non-root user,
bwrap makes a user namespace and `prlimit` sets RLIMIT_NPROC inside it, where the kernel counts the namespace's own
processes (not the user's training and DataLoader processes). stdout/stderr come back through pipes that the parent
caps at `output_bytes` (a flood is killed at once); when bwrap's pid 1 exits, the kernel kills the whole namespace.
A pass needs exit code 0 *and* a random marker printed after the checks, so `sys.exit(0)` before them fails.
`self_test()` proves the guarantees from inside before anything is scored.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
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

TOOLS = ("bwrap", "prlimit", "setpriv")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # symlinks into /usr on merged-/usr systems
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")  # the dynamic linker's cache; time.localtime()
OWN_MOUNTS = ("/tmp", "/proc", "/dev")  # the sandbox's own filesystems: the only writable mounts (self-test)
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"


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


@dataclass(frozen=True)
class Mount:
    """One entry of the sandbox's filesystem, in bwrap's terms (`--<kind> [source] dest`)."""
    kind: str  # ro-bind | symlink | dir | proc | dev | tmpfs | file | remount-ro
    dest: str
    source: str = ""  # a host path (ro-bind), a link target (symlink), an fd number (file)
    perms: str = ""  # octal mode of a dir, tmpfs or file
    size: int = 0  # bytes of a tmpfs


def check_program(prompt: str, completion: str, test: str, entry_point: str, marker: str) -> str:
    """The HumanEval program: the completed function, its tests, then the marker that proves the checks ran."""
    return prompt + completion + "\n" + test + f"\ncheck({entry_point})\nprint({marker!r})\n"


def detect_mechanism() -> str:
    """"bubblewrap" when bwrap and util-linux's prlimit (and setpriv, as root) are installed, else "none"."""
    needed = TOOLS if os.geteuid() == 0 else TOOLS[:2]
    return "bubblewrap" if all(shutil.which(t) for t in needed) else "none"


def sandbox_python() -> str:
    """The interpreter the programs run on: this one's real binary (a venv's python resolves to its base), or the
    base installation's own when the venv holds a copy (`venv --copies`: it finds its stdlib only through
    pyvenv.cfg, which is not in the sandbox)."""
    exe, prefix = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    if _under(exe, prefix) or _under(exe, "/usr"):
        return exe
    base = os.path.join(prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return base if os.path.exists(base) else exe


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mount_plan(limits: SandboxLimits, program_fd: int) -> list[Mount]:
    """The sandbox's whole filesystem; anything not listed here does not exist inside."""
    # the sandbox's own filesystems first: a bind below /tmp (a prefix there) then stays visible, not covered
    plan = [Mount("proc", "/proc"), Mount("dev", "/dev"),
            Mount("tmpfs", "/tmp", perms="1777", size=limits.file_size_bytes), Mount("ro-bind", "/usr", "/usr")]
    for top in TOP_LINKS:
        if os.path.islink(top):
            plan.append(Mount("symlink", top, os.readlink(top)))
        elif os.path.isdir(top):
            plan.append(Mount("ro-bind", top, top))
    prefix = os.path.realpath(sys.base_prefix)
    for path in [prefix, os.path.dirname(sandbox_python()), *filter(os.path.exists, ETC_FILES)]:
        if not any(_under(path, m.dest) for m in plan if m.kind == "ro-bind"):
            plan += _ro_bind(path, made={m.dest for m in plan})
    plan += [Mount("file", "/tmp/prog.py", str(program_fd), perms="0644"), Mount("remount-ro", "/")]
    return plan


def _ro_bind(path: str, made: set[str]) -> list[Mount]:
    """A read-only bind of `path`, its parents made 0755 (bwrap would copy the host's mode: a 0700 /root would hide
    a pyenv prefix from the sandbox's uid)."""
    parents = [str(p) for p in reversed(Path(path).parents) if str(p) != "/" and str(p) not in made]
    return [*(Mount("dir", p, perms="0755") for p in parents), Mount("ro-bind", path, path)]


def _bwrap_args(plan: list[Mount]) -> list[str]:
    """bwrap's command-line form of a mount plan."""
    args: list[str] = []
    for m in plan:
        if m.perms:
            args += ["--perms", m.perms]
        if m.size:
            args += ["--size", str(m.size)]
        args += [f"--{m.kind}", *([m.source] if m.source else []), m.dest]
    return args


def _limits_command(limits: SandboxLimits) -> list[str]:
    """prlimit, run inside the sandbox so that RLIMIT_NPROC counts only the sandbox's processes."""
    # CPU: the soft limit sends SIGXCPU ("timed out"); the hard one, 1 s later, SIGKILLs a program that catches it
    return ["prlimit", f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}", f"--as={limits.memory_bytes}",
            "--core=0", f"--fsize={limits.file_size_bytes}", f"--nofile={limits.open_files}",
            f"--nproc={limits.processes}", "--"]


def sandbox_command(limits: SandboxLimits, program_fd: int) -> list[str]:
    """bwrap + its mount plan + (as root) setpriv to a random uid + prlimit + python on /tmp/prog.py."""
    run = _limits_command(limits) + [sandbox_python(), "-I", "-B", "prog.py"]
    namespaces = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:  # a fresh host uid per run, never root's: no NPROC exemption, no root-owned files
        uid = 200000 + secrets.randbelow(800000)
        privs = ["--cap-drop", "ALL", *(a for c in ("SETUID", "SETGID", "SETPCAP") for a in ("--cap-add", f"CAP_{c}"))]
        run = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
               "--bounding-set=-all", "--no-new-privs", "--"] + run
    else:  # bwrap maps the user to itself in a user namespace, which may not nest another
        privs = ["--unshare-user", "--disable-userns"]
    return ["bwrap", *namespaces, *privs, "--die-with-parent", "--new-session", "--clearenv",
            *(a for k, v in ENV.items() for a in ("--setenv", k, v)), *_bwrap_args(mount_plan(limits, program_fd)),
            "--chdir", "/tmp", "--", *run]


def _set_limits(limits: SandboxLimits) -> None:
    """The prlimit limits, set in the child before it runs the program (the unsandboxed mode's only guard)."""
    import resource

    for which, value in ((resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1)),
                         (resource.RLIMIT_AS, (limits.memory_bytes,) * 2), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_FSIZE, (limits.file_size_bytes,) * 2),
                         (resource.RLIMIT_NOFILE, (limits.open_files,) * 2)):
        resource.setrlimit(which, value)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap and its pid-1 child (the kernel then kills the whole pid namespace); wait until it is gone."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in [proc.pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    for pid in map(int, children):  # pid 1 exits only after every process of its namespace is dead
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and \
                ") Z" not in Path(f"/proc/{pid}/stat").read_text(errors="replace"):
            time.sleep(0.005)


def _collect(proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until both close; stop early at the wall-clock limit or past `output_bytes` of output."""
    deadline = time.monotonic() + limits.wall_seconds
    out, err = bytearray(), bytearray()
    buffers = {proc.stdout: out, proc.stderr: err}
    with selectors.DefaultSelector() as sel:
        for f in buffers:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), bytes(err), "wall-clock limit"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                buffers[key.fileobj] += chunk
                if len(buffers[key.fileobj]) > limits.output_bytes:
                    return bytes(out), bytes(err), "output limit"
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return bytes(out), bytes(err), "wall-clock limit"
    return bytes(out), bytes(err), ""


def _status(rc: int, stopped: str, stdout: str, stderr: str, marker: str | None) -> tuple[str, str]:
    """Map how the run ended (exit code, 128 + signal, or why we stopped it) to a status and a one-line reason."""
    last = (stderr.strip().splitlines() or [""])[-1][:200]
    if stopped == "wall-clock limit":
        return "timed out", stopped
    if stopped:
        return "killed", stopped
    if rc in (128 + signal.SIGXCPU, -signal.SIGXCPU):
        return "timed out", "CPU limit"
    if rc > 128 or rc < 0:
        sig = rc - 128 if rc > 0 else -rc
        return "killed", f"signal {signal.Signals(sig).name}" if sig < signal.NSIG else f"exit {rc}"
    if rc != 0:
        return "failed", last or f"exit {rc}"
    if marker is not None and marker not in stdout:
        return "no marker", "exited 0 before the checks finished"
    return "passed", ""


def _start(source: str, limits: SandboxLimits, mechanism: str, cwd: str) -> subprocess.Popen:
    """Start the program under `mechanism`, its source handed over through a memfd (no host path involved)."""
    if mechanism == "unsandboxed":  # only limits and a temp cwd: the caller was told, and allowed it
        Path(cwd, "prog.py").write_text(source)
        return subprocess.Popen([sandbox_python(), "-I", "-B", "prog.py"], env=ENV, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=lambda: _set_limits(limits))
    fd = os.memfd_create("prog.py")
    try:
        os.write(fd, source.encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return subprocess.Popen(sandbox_command(limits, fd), env=ENV, cwd="/", pass_fds=(fd,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    finally:
        os.close(fd)


def run_program(source: str, limits: SandboxLimits, mechanism: str, marker: str | None = None) -> Result:
    """Run `source` isolated; it passes with exit code 0 and `marker` (when given) in its stdout."""
    if mechanism not in ("bubblewrap", "unsandboxed"):
        raise SandboxUnavailable(f"no sandbox mechanism ({mechanism!r}): {INSTALL_HINT}")
    start = time.monotonic()
    cwd = tempfile.mkdtemp(prefix="codeparrot-sandbox-") if mechanism == "unsandboxed" else ""
    proc = _start(source, limits, mechanism, cwd)
    try:
        out, err, stopped = _collect(proc, limits)
    finally:
        _kill_tree(proc)  # also after a normal exit: nothing may outlive the run
        if cwd:  # no pid namespace: kill what is left of its session's process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            shutil.rmtree(cwd, ignore_errors=True)
        proc.stdout.close()
        proc.stderr.close()
    stdout = out[:limits.output_bytes].decode(errors="replace")
    stderr = err[:limits.output_bytes].decode(errors="replace")
    status, detail = _status(proc.returncode, stopped, stdout, stderr, marker)
    return Result(status == "passed", status, detail, time.monotonic() - start, stdout)


PROBE = '''import json, os, socket
def own(path):
    return any(path == m or path.startswith(m + "/") for m in {own!r})
escaped = []
for line in open("/proc/self/mountinfo"):
    point, options = line.split()[4:6]
    if "rw" in options.split(",") and not own(point):
        escaped.append("writable mount " + point)
for d in {dirs!r}:
    if own(d):  # inside, that path is the sandbox's own filesystem; the host checks its own copy
        continue
    try:
        open(os.path.join(d, {name!r}), "x").close()
        escaped.append("wrote " + d)
    except OSError:
        pass
for family, address in ((socket.AF_UNIX, {unix!r}), (socket.AF_INET, ("127.0.0.1", {port!r}))):
    try:
        socket.socket(family).connect(address)
        escaped.append("connected to " + str(address))
    except OSError:
        pass
for table in ("/proc/net/route", "/proc/net/ipv6_route"):  # only the namespace's own loopback may have routes
    rows = open(table).read().splitlines()[table.endswith("/route"):] if os.path.exists(table) else []
    if [r for r in rows if r.split()[0 if table.endswith("/route") else -1] != "lo"]:
        escaped.append("ip route in " + table)
print(json.dumps(escaped) if escaped else {marker!r})
'''


def host_writable_dirs() -> list[str]:
    """World-writable dirs of the host: the usual ones, every mount point, and each mount point's children."""
    points = {line.split()[4].replace("\\040", " ") for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    candidates = {"/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue", *points}
    for point in sorted(points):
        if not point.startswith(("/proc", "/sys")):
            with contextlib.suppress(OSError):
                candidates.update(str(p) for p in list(Path(point).iterdir())[:200])
    found = []
    for d in sorted(candidates):
        with contextlib.suppress(OSError):
            st = os.stat(d)
            if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and not d.startswith(("/proc", "/sys")):
                found.append(d)
    return found


def self_test(mechanism: str, probe_dir: str | None = None) -> None:
    """Prove the guarantees from inside: only the sandbox's own mounts are writable, no host world-writable dir
    takes a file, a host Unix socket and a loopback port refuse the connection, and no IP route exists."""
    outside = tempfile.mkdtemp(prefix="codeparrot-selftest-", dir=probe_dir)
    os.chmod(outside, 0o777)  # writable and enterable by anyone: only the sandbox itself can stop the probe
    name = f".codeparrot-escape-{secrets.token_hex(8)}"
    dirs = sorted({*host_writable_dirs(), outside})
    marker = secrets.token_hex(16)
    with socket.socket(socket.AF_UNIX) as unix, socket.socket() as tcp:
        unix.bind(os.path.join(outside, "host.sock"))
        os.chmod(os.path.join(outside, "host.sock"), 0o777)
        tcp.bind(("127.0.0.1", 0))
        for s in (unix, tcp):
            s.listen(1)
            s.settimeout(0)
        probe = PROBE.format(own=OWN_MOUNTS, dirs=dirs, name=name, unix=os.path.join(outside, "host.sock"),
                             port=tcp.getsockname()[1], marker=marker)
        try:
            result = run_program(probe, SandboxLimits(wall_seconds=10), mechanism, marker)
            escaped = [f"host saw a connection on {kind}" for kind, s in (("a Unix socket", unix), ("loopback", tcp))
                       if _accepted(s)]
        finally:
            escaped_files = [d for d in dirs if os.path.lexists(os.path.join(d, name))]
            for d in escaped_files:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(d, name))
            shutil.rmtree(outside, ignore_errors=True)
    escaped += [f"a file landed in {d}" for d in escaped_files]
    if escaped or not result.passed:
        why = "; ".join(escaped) or f"{result.status}: {result.detail} {result.stdout[:300]}".strip()
        raise SandboxUnavailable(f"sandbox {mechanism!r} failed its self-test: {why}")


def _accepted(listener: socket.socket) -> bool:
    """Whether anything connected to `listener` (non-blocking)."""
    try:
        listener.accept()[0].close()
        return True
    except BlockingIOError:
        return False
