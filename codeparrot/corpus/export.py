"""The `export-local` stage: the local installation's `.py` files as a BigQuery-format export (the default corpus),
as gzipped JSON Lines or (`--format parquet`) Parquet holding the same records."""
from __future__ import annotations

import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..stage import Stage
from .formats import ParquetShardWriter
from .source import ShardWriter

EXPORT_FORMATS = ("jsonl", "parquet")

log = logging.getLogger(__name__)


def default_local_roots() -> list[str]:
    """The running interpreter's standard library directory, whose site-packages comes along."""
    return [sysconfig.get_paths()["stdlib"]]


def _repo_and_path(root: Path, file: Path) -> tuple[str, str]:
    """Invent a BigQuery-like repo_name: the top-level package (or module) under the root, or site-packages."""
    rel = file.relative_to(root).parts
    if "site-packages" in rel:
        i = rel.index("site-packages")
        head, rest = ("site-packages", rel[i + 1:])
    else:
        head, rest = (root.name, rel)
    top = rest[0] if len(rest) > 1 else Path(rest[0]).stem
    return f"{head}/{top}", "/".join(rest)


@dataclass
class ExportStats:
    """What `export_local` wrote and skipped; `bytes` counts the exported files' bytes (UTF-8 as on disk)."""

    files: int = 0
    bytes: int = 0
    shards: int = 0
    skipped_not_utf8: int = 0
    skipped_unreadable: int = 0
    skipped_empty: int = 0


def _python_files(root: Path):
    """The `.py` files under `root`, in a deterministic order (os.walk's is the filesystem's)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def export_local(out: str | Path, roots: list[str] | None = None, shard_records: int = 2000,
                 max_files: int = 0, fmt: str = "jsonl") -> ExportStats:
    """Write the `.py` files under `roots` as BigQuery-format export shards (`fmt`: jsonl or parquet), in a
    deterministic order."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    stats = ExportStats()
    with (ParquetShardWriter if fmt == "parquet" else ShardWriter)(out, shard_records) as writer:
        for root_s in roots or default_local_roots():
            root = Path(root_s).resolve()
            if not root.is_dir():
                raise FileNotFoundError(f"export root {root} is not a directory")
            for file in _python_files(root):
                if max_files and writer.n_records >= max_files:
                    break  # the cap counts over all roots, not per root
                try:
                    data = file.read_bytes()
                except OSError:
                    stats.skipped_unreadable += 1
                    continue
                try:
                    content = data.decode("utf-8")
                except UnicodeDecodeError:
                    stats.skipped_not_utf8 += 1
                    continue
                if not content.strip():
                    stats.skipped_empty += 1
                    continue
                repo, path = _repo_and_path(root, file)
                license_ = "unknown" if repo.startswith("site-packages/") else "psf-2.0"
                # BigQuery writes INT64 columns as JSON strings.
                writer.write({"repo_name": repo, "path": path, "copies": "1", "size": str(len(data)),
                              "content": content, "license": license_})
                stats.bytes += len(data)
    stats.files, stats.shards = writer.n_records, writer.n_shards
    return stats


def _roots(cfg: Config) -> list[str]:
    return [str(Path(r).resolve()) for r in (cfg.corpus.local_roots or default_local_roots())]


def _build(cfg: Config, tmp: Path) -> dict[str, Any]:
    c = cfg.corpus
    stats = export_local(tmp, _roots(cfg), c.export_shard_records, c.local_max_files, c.export_format)
    log.info("export-local: %d files (%.1f MB) in %d shards; skipped %d not UTF-8, %d unreadable, %d empty",
             stats.files, stats.bytes / 1e6, stats.shards, stats.skipped_not_utf8, stats.skipped_unreadable,
             stats.skipped_empty)
    return dict(vars(stats))


EXPORT_LOCAL = Stage(
    name="export-local", output="raw",
    keys=("corpus.local_roots", "corpus.export_shard_records", "corpus.local_max_files", "corpus.export_format"),
    # The files exported depend on where the roots resolve and on which interpreter's stdlib is the default.
    extra_inputs=lambda cfg: {"roots": ",".join(_roots(cfg)), "python": sys.version.split()[0]},
    build=_build, save_config=False,  # the CLI's export-local takes flags, not a config
    help="export the local Python installation as BigQuery-format shards")


def run_export_local(out: str | Path, roots: list[str] | None = None, shard_records: int = 2000,
                     max_files: int = 0, fmt: str = "jsonl") -> dict[str, Any]:
    """Export the local installation's `.py` files as BigQuery-format shards (`fmt`: jsonl or parquet) under `out`."""
    cfg = Config()
    cfg.paths.raw = str(out)
    cfg.corpus.local_roots = list(roots or [])
    cfg.corpus.export_shard_records, cfg.corpus.local_max_files = shard_records, max_files
    cfg.corpus.export_format = fmt
    return EXPORT_LOCAL.run(cfg)
