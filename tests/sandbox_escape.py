"""Run as root inside `unshare --mount --propagation private`: a host with a world-writable tmpfs outside /tmp and a
Unix socket on it, as a /scratch, an NFS share or Docker's socket would be. Prints what a sandboxed program reached.

    unshare --mount --propagation private python tests/sandbox_escape.py MOUNTPOINT [SANDBOX_MODULE_FILE]
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path


def load_sandbox(path: str | None):
    """codeparrot.sandbox, or another version of it from a file (to show what an older sandbox let through)."""
    if not path:
        from codeparrot import sandbox
        return sandbox
    spec = importlib.util.spec_from_file_location("sandbox_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    point = Path(sys.argv[1])
    sandbox = load_sandbox(sys.argv[2] if len(sys.argv) > 2 else None)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=1m", "escape-test", str(point)], check=True)
    target, sock_path = point / f"escaped-{secrets.token_hex(4)}", point / "host.sock"
    mechanism = sandbox.detect_mechanism()
    with socket.socket(socket.AF_UNIX) as host:
        host.bind(str(sock_path))
        os.chmod(sock_path, 0o777)
        host.listen(1)
        program = (f"import socket\ntry:\n    open({str(target)!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
                   f"try:\n    socket.socket(socket.AF_UNIX).connect({str(sock_path)!r})\nexcept OSError:\n    pass\n")
        result = sandbox.run_program(program, sandbox.SandboxLimits(wall_seconds=10), mechanism)
        host.settimeout(0)
        try:
            host.accept()[0].close()
            connected = True
        except BlockingIOError:
            connected = False
    try:
        sandbox.self_test(mechanism)
        self_test = "passed"
    except sandbox.SandboxUnavailable as e:
        self_test = str(e)
    print(json.dumps({"mechanism": mechanism, "status": result.status, "wrote": target.exists(),
                      "connected": connected, "self_test": self_test}))


if __name__ == "__main__":
    main()
