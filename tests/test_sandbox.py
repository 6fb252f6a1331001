"""The sandbox against real programs, correct and hostile: each hostile one must fail and leave no trace."""
from __future__ import annotations

import os
import secrets
import socket
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


def run(source: str, limits: SandboxLimits = LIMITS, mechanism: str = "namespaces") -> tuple[Result, str]:
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
    result, _ = run("open('/etc/shadow').read()\n", mechanism=mechanism)
    assert not result.passed and "PermissionError" in result.detail, result


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
