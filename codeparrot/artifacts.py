"""Self-describing artifact directories: manifests, fingerprints, atomic writes, up-to-date checks."""
from __future__ import annotations

import contextlib
import gzip
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .config import Config, canonical_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or damaged."""


# Out of space on the device, over a file-size limit (RLIMIT_FSIZE, the filesystem's), or over a disk quota.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class DiskFull(OSError):
    """A write that failed for lack of space; `filename` is the file, or the artifact directory, being written."""


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The disk-full OSError that `exc` is or was raised from (a pool re-raises its worker's), else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None when absent or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fingerprint(directory: str | Path) -> str:
    """Identity of an artifact: its manifest's fingerprint, or (for a foreign export) file names, sizes and mtimes."""
    manifest = read_manifest(directory)
    if manifest and "fingerprint" in manifest:
        return manifest["fingerprint"]
    h = hashlib.sha256()
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"artifact directory {root} does not exist")
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _identity(stage: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    return hashlib.sha256(canonical_json({"stage": stage, "config": config, "inputs": inputs}).encode()).hexdigest()[:16]


def is_up_to_date(directory: str | Path, stage: str, config: dict[str, Any], inputs: dict[str, str]) -> bool:
    """True when `directory` holds a complete artifact made by `stage` from this config and these inputs."""
    manifest = read_manifest(directory)
    return bool(manifest) and manifest.get("fingerprint") == _identity(stage, config, inputs)


def write_manifest(
    directory: str | Path, stage: str, config: dict[str, Any], inputs: dict[str, str],
    counts: dict[str, Any], seconds: float, full_config: Config | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` (and `config.yaml` when given the whole tree) into an artifact directory."""
    manifest = {
        "stage": stage,
        "fingerprint": _identity(stage, config, inputs),
        "config": config,
        "inputs": inputs,
        "counts": counts,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
    }
    Path(directory, MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    if full_config is not None:
        full_config.save(Path(directory) / "config.yaml")
    return manifest


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` and swap it in only when the block completes.

    An interrupted stage leaves `final.tmp` behind, never a partial `final`.
    """
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file, gzipped when it ends in .gz."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
