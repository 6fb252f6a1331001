"""Export shards: robust reading (bad input is counted and skipped, never fatal) of JSON Lines, Parquet and Avro
(the columnar formats in formats.py), and writing of JSON Lines."""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson
from isal import igzip, isal_zlib

from .bad import LOGGED_BAD_RECORDS, BadRecords, TooManyBadRecords  # noqa: F401 (re-exported: readers' API)
from .fields import LAYOUTS, FieldMap
from .formats import COLUMNAR_SUFFIXES, iter_columnar  # pyarrow and fastavro load only when a columnar shard is read

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".avro")  # formats.py reads the last two
RAW_FIELDS = ("repo_name", "path", "copies", "size", "content", "license")
BIGQUERY = FieldMap(tuple((name, name) for name in LAYOUTS["bigquery"]), passthrough=True)  # records as read
# Artifact metadata that sits beside the shards.
NOT_SHARDS = {"manifest.json", "report.json", "near_duplicate_clusters.jsonl"}
WRITE_CHUNK = 1 << 20  # ShardWriter hands the compressor this much at a time (few calls; the bytes are the lines')
# gzip levels that ISA-L's igzip writes (0-3: ~4x faster than zlib's level 1, and as small); 4-9 go to zlib
ISAL_LEVELS = range(0, 4)
_EXACT_TYPES = (str, int, bool, type(None))  # values orjson reads and writes exactly as the json module does


def is_url(spec: str | Path) -> bool:
    """Whether a shard location is a URL read through fsspec (hf://, gs://, s3://, https://)."""
    return isinstance(spec, str) and "://" in spec


def list_remote_shards(url: str) -> list[str]:
    """Shard URLs under a remote directory or matching a remote glob, sorted."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    found = fs.glob(root) if any(c in root for c in "*?[") else fs.find(root)
    protocol = url.split("://", 1)[0]
    names = [f for f in found if f.endswith(SHARD_SUFFIXES) and f.rsplit("/", 1)[-1] not in NOT_SHARDS]
    if not names:
        raise FileNotFoundError(f"no shards found at {url}")
    return sorted(f"{protocol}://{name}" for name in names)


def shard_name(path: str | Path) -> str:
    """A shard's file name, local or remote."""
    return path.rsplit("/", 1)[-1] if is_url(path) else Path(path).name


def shard_size(path: str | Path) -> int:
    """A shard's size in bytes, local or remote."""
    if is_url(path):
        import fsspec

        fs, name = fsspec.core.url_to_fs(path)
        return int(fs.size(name) or 0)
    return Path(path).stat().st_size


def remote_fingerprint(url: str) -> str:
    """Identity of a remote export: its shard names and sizes."""
    h = hashlib.sha256()
    for shard in list_remote_shards(url):
        h.update(f"{shard}:{shard_size(shard)}\n".encode())
    return h.hexdigest()[:16]


def list_shards(spec: str | Path | Iterable[str | Path]) -> list:
    """Shard files from a directory, a glob, a single file, or a list of those, sorted by name; a URL (with a
    glob or a directory) lists remote shards, as URL strings."""
    if is_url(spec):
        return list_remote_shards(spec)
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


def utf8_len(text: str) -> int:
    """The length of `text` in UTF-8 bytes (what reports call bytes), without encoding ASCII text."""
    # str.isascii() reads a flag of CPython's compact strings: O(1), and most source files are ASCII.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def parse_record(raw: bytes) -> Any:
    """One JSON line, as `json.loads` reads it: orjson (2x faster) where it agrees, the json module where not."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:  # NaN, lone surrogates, bad UTF-8...: the json module decides (and names it)
        return json.loads(raw.decode("utf-8"))
    if isinstance(record, dict) and not all(type(v) in _EXACT_TYPES for v in record.values()):
        # orjson reads integers past 64 bits as floats; floats and nested values are rare in exports, so those
        # records are read again by the json module, which keeps every number whole
        return json.loads(raw.decode("utf-8"))
    return record


def record_line(record: dict[str, Any]) -> bytes:
    """A record as one JSON line in UTF-8 (what every shard holds); raises UnicodeEncodeError on lone surrogates."""
    if all(type(v) in _EXACT_TYPES or (type(v) is float and math.isfinite(v)) for v in record.values()):
        try:
            return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)  # ~5x faster than json.dumps
        except TypeError:  # an int past 64 bits, or a lone surrogate: the json module writes (or refuses) it
            pass
    # orjson would write NaN as null: non-finite floats and nested values go through the json module
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _open_lines(path: str | Path, fast: bool = True):
    # Binary lines: decoding per line lets one bad byte sequence cost one record, not the file. ISA-L's igzip
    # decompresses ~3x faster than gzip; the stdlib's reader, which yields every line before a cut, recovers a
    # damaged file's tail (iter_shard).
    opener = igzip.IGzipFile if fast else gzip.GzipFile
    if is_url(path):
        import fsspec

        raw = fsspec.open(path, "rb").open()
        return opener(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
    return opener(path, "rb") if Path(path).name.endswith(".gz") else open(path, "rb")


def iter_shard(path: str | Path, bad: BadRecords, start_line: int = 0, fast: bool = True,
               fields: FieldMap | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) from one shard, skipping and counting bad input; `fields` (default: BigQuery's
    names, records as read) renames the input's columns to ours. A Parquet or Avro shard's rows are its lines.

    Lines before `start_line` are read and discarded (gzip cannot seek), which is how a reader resumes.
    """
    if str(path).endswith(COLUMNAR_SUFFIXES):
        yield from iter_columnar(path, bad, fields or BIGQUERY, start_line)
        return
    path = path if is_url(path) else Path(path)
    line_no = -1
    try:
        with _open_lines(path, fast) as fh:
            for line_no, raw in enumerate(fh):
                if line_no < start_line or not raw.strip():
                    continue
                where = f"{path}:{line_no + 1}"
                try:
                    record = parse_record(raw)
                except UnicodeDecodeError as e:
                    bad.add("invalid_utf8", where, str(e)[:80])
                    continue
                except ValueError as e:
                    bad.add("invalid_json", where, str(e)[:80])
                    continue
                if fields is not None and not fields.passthrough and isinstance(record, dict):
                    record = fields.apply(record)
                if not isinstance(record, dict) or not isinstance(record.get("content"), str):
                    bad.add("missing_content", where, "no string 'content' field")
                    continue
                bad.good += 1
                yield line_no, record
    except (EOFError, gzip.BadGzipFile, zlib.error, isal_zlib.error) as e:
        if fast:  # igzip decompresses ahead in large blocks: the stdlib's reader yields the lines it held back
            yield from iter_shard(path, bad, max(start_line, line_no + 1), fast=False, fields=fields)
            return
        bad.add("truncated_or_corrupt_file", f"{path}:{line_no + 2}", str(e)[:80])
    except OSError as e:
        bad.add("unreadable_file", str(path), str(e)[:80])
    except Exception as e:  # a remote read cut off mid-download (httpx, botocore, ... raise their own kinds)
        if not is_url(path):
            raise
        bad.add("truncated_or_corrupt_file", f"{path}:{line_no + 2}", f"{type(e).__name__}: {e}"[:80])


def iter_records(files: Iterable[str | Path], bad: BadRecords, fields: FieldMap | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Stream good records from many shards in order."""
    for f in files:
        for _, record in iter_shard(f, bad, fields=fields):
            yield record


class ShardWriter:
    """Writes records as numbered `file-000000000000.json.gz` shards, a new shard every `shard_records`.

    The bytes depend only on the lines written and the level (lines are buffered into WRITE_CHUNK writes), so two
    writers given the same lines write the same files, whichever path made the lines.
    """

    def __init__(self, directory: str | Path, shard_records: int, compresslevel: int = 6):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_records = max(1, shard_records)
        self.compresslevel = compresslevel
        self.n_shards = 0
        self.n_records = 0
        self._fh = None
        self._in_shard = 0
        self._buffer = bytearray()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, starting a new shard every `shard_records`."""
        self.write_line(record_line(record))

    def write_line(self, line: bytes) -> None:
        """Append one record already written as a JSON line (record_line's bytes)."""
        if self._fh is None or self._in_shard >= self.shard_records:
            self._roll()
        self._buffer += line
        if len(self._buffer) >= WRITE_CHUNK:
            self._flush()
        self._in_shard += 1
        self.n_records += 1

    def _flush(self) -> None:
        self._fh.write(self._buffer)
        self._buffer.clear()

    def _roll(self) -> None:
        self.close()
        name = f"file-{self.n_shards:012d}.json.gz"
        # mtime=0: the gzip header otherwise stamps the current time, and equal exports would differ in bytes.
        opener = igzip.IGzipFile if self.compresslevel in ISAL_LEVELS else gzip.GzipFile
        self._fh = opener(self.directory / name, "wb", compresslevel=self.compresslevel, mtime=0)
        self.n_shards += 1
        self._in_shard = 0

    def close(self) -> None:
        if self._fh is not None:
            self._flush()
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
