"""The sandbox against real programs, correct and hostile: each hostile one must fail and leave no trace."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from codeparrot.sandbox import (Result, SandboxLimits, SandboxUnavailable, check_program, detect_mechanism,
                                run_program, self_test)

LIMITS = SandboxLimits(cpu_seconds=3, wall_seconds=4.0)
PROJECT = Path(__file__).resolve().parents[1]
PROMPT = 'def add(a, b):\n    """Sum of a and b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def mechanism() -> str:
    """The machine's mechanism, proven by the self-test; no mechanism is a loud failure, never a skip."""
    found = detect_mechanism()
    try:
        self_test(found)
    except SandboxUnavailable as e:
        pytest.fail(f"no working sandbox on this machine: {e}")
    return found


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A world-writable dir outside the sandbox: only the sandbox's own isolation can stop writes to it."""
    d = Path(tempfile.mkdtemp(prefix="sandbox-outside-"))
    os.chmod(d, 0o777)
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def sandbox_processes(token: str = "") -> list[str]:
    """Live processes that belong to a sandbox: a sandbox uid (>= 200000) or `token` in their command line."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            uid = int((p / "status").read_text().split("\nUid:")[1].split()[0])
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (uid >= 200000 or (token and token in cmdline)):
            found.append(f"{p.name} uid={uid} {cmdline}")
    return found


def run(source: str, limits: SandboxLimits = LIMITS, mechanism: str = "bubblewrap") -> tuple[Result, str]:
    """Run `source` + a marker line; return the result and the marker."""
    marker = secrets.token_hex(16)
    return run_program(source + f"\nprint({marker!r})\n", limits, mechanism, marker), marker


def assert_no_trace(token: str = "") -> None:
    """No sandboxed process outlives its run, and no host temp dir of the sandbox is left."""
    assert sandbox_processes(token) == []
    assert list(Path(tempfile.gettempdir()).glob("codeparrot-sandbox-*")) == []


def test_correct_program_passes(mechanism: str) -> None:
    marker = secrets.token_hex(16)
    result = run_program(check_program(PROMPT, "    return a + b\n", TEST, "add", marker), LIMITS, mechanism, marker)
    assert (result.passed, result.status) == (True, "passed"), result
    assert marker in result.stdout
    assert_no_trace()


def test_check_program_layout() -> None:
    assert check_program("P", "C", "T", "f", "m") == "PC\nT\ncheck(f)\nprint('m')\n"


def test_assertion_failure_fails(mechanism: str) -> None:
    marker = secrets.token_hex(16)
    result = run_program(check_program(PROMPT, "    return a - b\n", TEST, "add", marker), LIMITS, mechanism, marker)
    assert (result.passed, result.status) == (False, "failed"), result
    assert "AssertionError" in result.detail


def test_exit_before_checks_has_no_marker(mechanism: str) -> None:
    marker = secrets.token_hex(16)
    source = check_program(PROMPT, "    return 0\nimport sys\nsys.exit(0)\n", TEST, "add", marker)
    result = run_program(source, LIMITS, mechanism, marker)
    assert (result.passed, result.status) == (False, "no marker"), result


def test_network_is_unreachable(mechanism: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result, _ = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
                        mechanism=mechanism)
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert not result.passed and result.status == "failed", result
    assert_no_trace()


@pytest.mark.parametrize("where", ["world-writable", "project"])
def test_write_outside_fails(mechanism: str, outside: Path, where: str) -> None:
    target = (outside if where == "world-writable" else PROJECT) / f"escaped-{secrets.token_hex(8)}"
    try:
        result, _ = run(f"open({str(target)!r}, 'w').write('x')\n", mechanism=mechanism)
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)
    assert not result.passed and result.status == "failed", result
    assert_no_trace()


def test_ctypes_shell_cannot_write_outside(mechanism: str, outside: Path) -> None:
    target = outside / "touched"
    result, _ = run(f"import ctypes\nassert ctypes.CDLL(None).system(b'touch {target}') == 0\n", mechanism=mechanism)
    assert not target.exists()
    assert not result.passed, result
    assert_no_trace()


def test_secrets_are_unreadable(mechanism: str) -> None:
    result, _ = run("open('/etc/shadow').read()\n", mechanism=mechanism)  # not in the sandbox's root at all
    assert not result.passed and "FileNotFoundError" in result.detail, result


def test_fork_bomb_is_bounded(mechanism: str) -> None:
    token = secrets.token_hex(8)
    source = ("import os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n"
              f"            os.execv('/bin/sleep', ['sleep', '1000', '{token}'])\n"
              "    except OSError:\n        time.sleep(0.05)\n")
    start = time.monotonic()
    result, _ = run(source, mechanism=mechanism)
    assert time.monotonic() - start < LIMITS.wall_seconds + 2
    assert not result.passed and result.status == "timed out", result
    assert_no_trace(token)


def test_daemon_does_not_outlive_the_run(mechanism: str) -> None:
    token = secrets.token_hex(8)
    source = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv('/bin/sleep', ['sleep', '1000', '{token}'])\n    os._exit(0)\n"
              "os.wait()\nsys.exit(0)\n")
    result, _ = run(source, mechanism=mechanism)
    assert (result.passed, result.status) == (False, "no marker"), result
    assert_no_trace(token)


def test_memory_hog_fails(mechanism: str) -> None:
    # A CPU budget that a loaded 2-core machine cannot exhaust first (3 s did once, under the full suite)
    hog = SandboxLimits(cpu_seconds=10, wall_seconds=12.0, memory_bytes=256 << 20)
    result, _ = run("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n", hog, mechanism)
    assert not result.passed and "MemoryError" in result.detail, result
    assert_no_trace()


def test_output_flood_is_capped_and_quick(mechanism: str) -> None:
    start = time.monotonic()
    result, _ = run("while True:\n    print('x' * 4096)\n", mechanism=mechanism)
    assert time.monotonic() - start < 2
    assert not result.passed and len(result.stdout) <= LIMITS.output_bytes, result
    assert_no_trace()


def test_loop_ignoring_sigalrm_is_killed_at_wall_timeout(mechanism: str) -> None:
    limits = SandboxLimits(cpu_seconds=30, wall_seconds=2.0)
    source = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nsignal.alarm(1)\nwhile True:\n    pass\n"
    start = time.monotonic()
    result, _ = run(source, limits, mechanism)
    assert limits.wall_seconds <= time.monotonic() - start < limits.wall_seconds + 1
    assert (result.passed, result.status, result.detail) == (False, "timed out", "wall-clock limit"), result
    assert_no_trace()


def test_cpu_limit(mechanism: str) -> None:
    result, _ = run("while True:\n    pass\n", SandboxLimits(cpu_seconds=1, wall_seconds=10.0), mechanism)
    assert (result.passed, result.status, result.detail) == (False, "timed out", "CPU limit"), result


def test_no_mechanism_refuses() -> None:
    with pytest.raises(SandboxUnavailable, match="no sandbox mechanism"):
        run_program("print(1)\n", LIMITS, "none")


def test_world_writable_mount_and_host_socket_are_out_of_reach(mechanism: str) -> None:
    # A 1777 tmpfs at /srv with a 0777 Unix socket on it, in a mount namespace of the test's own (the host's /srv is
    # untouched): the old `remount,bind,ro /` sandbox wrote the file and connected, and its self-test passed.
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          str(Path(__file__).with_name("sandbox_escape.py")), "/srv"],
                         capture_output=True, text=True, timeout=120, cwd=PROJECT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {"mechanism": mechanism, "status": "passed", "wrote": False, "connected": False,
                      "self_test": "passed"}, report
    assert_no_trace()


NONROOT_PROGRAM = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
forks = ("import os, time\\nkids = []\\nfor _ in range(8):\\n    kids.append(os.fork())\\n    if kids[-1] == 0:\\n"
         "        time.sleep(0.2)\\n        os._exit(0)\\nassert all(os.waitpid(k, 0)[1] == 0 for k in kids)\\n"
         "print('forked')\\n")
mechanism = sandbox.detect_mechanism()
result = sandbox.run_program(forks, sandbox.SandboxLimits(processes=64), mechanism, "forked")
print(json.dumps({"mechanism": mechanism, "status": result.status, "detail": result.detail}))
"""


def test_non_root_process_limit_counts_only_the_sandbox(tmp_path: Path) -> None:
    # A user already running 80 processes (training, DataLoader workers) must still get the sandbox's own 64: bwrap's
    # user namespace and a limit set inside it, not a user-wide --nproc 64 that fails every fork
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("needs /usr/bin/python3: this interpreter lives where a non-root uid may not enter")
    uid = 100000 + secrets.randbelow(90000)
    code = Path(tempfile.mkdtemp(prefix="sandbox-nonroot-"))
    os.chmod(code, 0o755)
    shutil.copy(PROJECT / "codeparrot" / "sandbox.py", code / "sandbox.py")
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    busy = [subprocess.Popen(as_user + ["sleep", "60"]) for _ in range(80)]
    try:
        out = subprocess.run(as_user + [python, "-I", "-c", NONROOT_PROGRAM, str(code / "sandbox.py")], cwd="/",
                             capture_output=True, text=True, timeout=60)
    finally:
        for p in busy:
            p.kill()
            p.wait()
        shutil.rmtree(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"mechanism": "bubblewrap", "status": "passed", "detail": ""}, out.stdout


def test_self_test_catches_a_run_without_isolation() -> None:
    # the probe itself must be able to fail: unisolated, it writes to the host's dirs and reaches both sockets
    with pytest.raises(SandboxUnavailable) as failed:
        self_test("unsandboxed")
    assert "host saw a connection on a Unix socket" in str(failed.value)
    assert "a file landed in " in str(failed.value)
    assert list(Path(tempfile.gettempdir()).glob("codeparrot-selftest-*")) == []


def test_a_venv_with_a_copied_interpreter_runs_on_its_base(monkeypatch, tmp_path):
    # `python -m venv --copies` (or a venv copied elsewhere): the copy finds its stdlib only through pyvenv.cfg,
    # which the sandbox does not hold, so the programs run on the base installation's binary
    from codeparrot import sandbox

    copy = tmp_path / "venv" / "bin" / "python"
    copy.parent.mkdir(parents=True)
    shutil.copy(os.path.realpath(sys.executable), copy)
    monkeypatch.setattr(sys, "executable", str(copy))
    python = sandbox.sandbox_python()
    assert python != str(copy) and python.startswith(os.path.realpath(sys.base_prefix))
    marker = secrets.token_hex(16)
    result = run_program(f"print({marker!r})\n", LIMITS, detect_mechanism(), marker)
    assert result.passed, result
