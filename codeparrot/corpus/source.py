"""BigQuery-format export shards: robust reading, writing, and the local-installation exporter."""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
RAW_FIELDS = ("repo_name", "path", "copies", "size", "content", "license")
# Artifact metadata that sits beside the shards.
NOT_SHARDS = {"manifest.json", "report.json", "near_duplicate_clusters.jsonl"}
LOGGED_BAD_RECORDS = 20  # log this many bad records per stream one line each, then only count


class TooManyBadRecords(RuntimeError):
    """The share of bad records passed `corpus.max_bad_ratio`."""


@dataclass
class BadRecords:
    """Counts of skipped input by kind, with the max-ratio policy."""

    max_ratio: float = 1.0
    min_records: int = 200  # don't judge the ratio on a handful of records
    good: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bad(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, where: str, detail: str = "") -> None:
        """Count one bad record (or unreadable file) and log it, once, with file and line."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        n = self.total_bad
        if n <= LOGGED_BAD_RECORDS:
            log.warning("skipped %s at %s%s", kind, where, f": {detail}" if detail else "")
            if n == LOGGED_BAD_RECORDS:
                log.warning("further bad records are counted but not logged")
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise when the bad share exceeds the configured ratio."""
        bad = self.total_bad
        seen = bad + self.good
        if seen and (final or seen >= self.min_records) and bad / seen > self.max_ratio:
            raise TooManyBadRecords(
                f"{bad} of {seen} records were bad ({bad / seen:.1%}), more than corpus.max_bad_ratio="
                f"{self.max_ratio}; by kind: {self.counts}. The log names the first files and lines."
            )

    def as_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": self.total_bad, "bad_by_kind": dict(self.counts)}


def list_shards(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """Shard files from a directory, a glob, a single file, or a list of those, sorted by name."""
    if isinstance(spec, (str, Path)):
        specs = [spec]
    else:
        specs = list(spec)
    files: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            files += [f for f in p.rglob("*")
                      if f.is_file() and f.name.endswith(SHARD_SUFFIXES) and f.name not in NOT_SHARDS]
        elif p.is_file():
            files.append(p)
        else:
            matches = [Path(m) for m in glob.glob(str(s), recursive=True)]
            if not matches:
                raise FileNotFoundError(f"no shards found at {s}")
            files += [m for m in matches
                      if m.is_file() and m.name.endswith(SHARD_SUFFIXES) and m.name not in NOT_SHARDS]
    return sorted(set(files))


def _open_lines(path: Path):
    # Binary lines: decoding per line lets one bad byte sequence cost one record, not the file.
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_shard(path: str | Path, bad: BadRecords, start_line: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) from one shard, skipping and counting bad input.

    Lines before `start_line` are read and discarded (gzip cannot seek), which is how a reader resumes.
    """
    path = Path(path)
    line_no = -1
    try:
        with _open_lines(path) as fh:
            for line_no, raw in enumerate(fh):
                if line_no < start_line or not raw.strip():
                    continue
                where = f"{path}:{line_no + 1}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    bad.add("invalid_utf8", where, str(e)[:80])
                    continue
                except ValueError as e:
                    bad.add("invalid_json", where, str(e)[:80])
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("content"), str):
                    bad.add("missing_content", where, "no string 'content' field")
                    continue
                bad.good += 1
                yield line_no, record
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        bad.add("truncated_or_corrupt_file", f"{path}:{line_no + 2}", str(e)[:80])
    except OSError as e:
        bad.add("unreadable_file", str(path), str(e)[:80])


def iter_records(files: Iterable[str | Path], bad: BadRecords) -> Iterator[dict[str, Any]]:
    """Stream good records from many shards in order."""
    for f in files:
        for _, record in iter_shard(f, bad):
            yield record


def _records_generator(files: list[str], max_bad_ratio: float = 1.0) -> Iterator[dict[str, Any]]:
    bad = BadRecords(max_ratio=max_bad_ratio)
    for record in iter_records(files, bad):
        yield {"content": record["content"], "repo_name": str(record.get("repo_name", "")),
               "path": str(record.get("path", ""))}
    bad.check(final=True)


def as_hf_dataset(files: list[Path], max_bad_ratio: float = 1.0):
    """The shards as a streaming `datasets.IterableDataset` of (content, repo_name, path)."""
    import datasets

    # datasets' JSON loader fails a whole file at the first bad line, so wrap our skipping reader;
    # the shard list in gen_kwargs keeps n_shards, so .shard() and split_dataset_by_node still work.
    return datasets.IterableDataset.from_generator(
        _records_generator, gen_kwargs={"files": [str(f) for f in files], "max_bad_ratio": max_bad_ratio}
    )


class ShardWriter:
    """Writes records as numbered `file-000000000000.json.gz` shards, a new shard every `shard_records`."""

    def __init__(self, directory: str | Path, shard_records: int, compresslevel: int = 6):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_records = max(1, shard_records)
        self.compresslevel = compresslevel
        self.n_shards = 0
        self.n_records = 0
        self.n_bytes = 0
        self._fh = None
        self._in_shard = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None or self._in_shard >= self.shard_records:
            self._roll()
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self._fh.write(line.encode("utf-8"))
        self._in_shard += 1
        self.n_records += 1
        self.n_bytes += len(record.get("content", ""))

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"file-{self.n_shards:012d}.json.gz"
        # mtime=0: the gzip header otherwise stamps the current time, and equal exports would differ in bytes.
        self._fh = gzip.GzipFile(self.directory / name, "wb", compresslevel=self.compresslevel, mtime=0)
        self.n_shards += 1
        self._in_shard = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    files: int = 0
    bytes: int = 0
    shards: int = 0
    skipped_not_utf8: int = 0
    skipped_unreadable: int = 0
    skipped_empty: int = 0


def export_local(out: str | Path, roots: list[str] | None = None, shard_records: int = 2000,
                 max_files: int = 0) -> ExportStats:
    """Write the `.py` files under `roots` as BigQuery-format export shards, in a deterministic order."""
    roots = roots or default_local_roots()
    stats = ExportStats()
    out = Path(out)
    with ShardWriter(out, shard_records) as writer:
        for root_s in roots:
            if max_files and writer.n_records >= max_files:
                break  # the cap counts over all roots, not per root
            root = Path(root_s).resolve()
            if not root.is_dir():
                raise FileNotFoundError(f"export root {root} is not a directory")
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()  # os.walk order is filesystem order; sorting makes the export deterministic
                for name in sorted(filenames):
                    if not name.endswith(".py"):
                        continue
                    file = Path(dirpath) / name
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
                    if max_files and writer.n_records >= max_files:
                        break
                if max_files and writer.n_records >= max_files:
                    break
    stats.files, stats.bytes, stats.shards = writer.n_records, writer.n_bytes, writer.n_shards
    return stats
