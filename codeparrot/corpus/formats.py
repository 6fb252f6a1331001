"""Columnar shards: Parquet (pyarrow, record batch by record batch) and Avro (fastavro, block by block).

A row's number is its `line` (0-based), as a JSON Lines shard's line number, so the stage's bookkeeping (candidates,
clusters file, resume) is the same for every format. The bad-input rules are JSON Lines' (source.iter_shard):
- a file whose footer or header cannot be read, or that breaks mid-file: `truncated_or_corrupt_file`, once, at the
  row where it broke (rows before it are kept); a Parquet file whose footer was read also counts each further row
  it holds as `rows_after_damage` (one event), so the bad ratio weighs the rows lost as records, as the rows of a
  cut JSON Lines shard would be had they been readable (Avro's header gives no row count);
- a file without a column it must have (FieldMap.check): `missing_column`, once per row (the footer or the blocks
  give the count, one event), so the bad ratio weighs it as the records it holds;
- a null or non-string content: `missing_content`, per row.
Local paths and fsspec URLs (hf://, s3://...) go through the same code: a URL is opened as a seekable fsspec file,
which reads byte ranges (a Parquet footer, then its row groups), never the whole file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .bad import TooManyBadRecords
from .fields import FieldMap, MissingColumns

log = logging.getLogger(__name__)

COLUMNAR_SUFFIXES = (".parquet", ".avro")
PARQUET = ".parquet"
BATCH_ROWS = 512  # rows per Parquet record batch: a few MB of code, whatever the row group size


def is_columnar(path: str | Path) -> bool:
    """Whether a shard is Parquet or Avro (by its name)."""
    return str(path).endswith(COLUMNAR_SUFFIXES)


def _open(path: str | Path):
    if "://" in str(path):
        import fsspec

        # Parquet: pyarrow reads a column chunk in one call, so each read is one range request, and a read-ahead
        # cache would only fetch columns the mapping leaves out (and hold a block besides). Avro reads small pieces.
        fs, name = fsspec.core.url_to_fs(str(path))
        return fs.open(name, "rb", cache_type="none" if str(path).endswith(PARQUET) else "readahead")
    return open(path, "rb")


def shard_columns(path: str | Path) -> list[str]:
    """A columnar shard's column names, from its footer (Parquet) or header (Avro)."""
    with _open(path) as fh:
        if str(path).endswith(PARQUET):
            import pyarrow.parquet as pq

            return pq.ParquetFile(fh).schema_arrow.names
        import fastavro

        return [f["name"] for f in fastavro.reader(fh).writer_schema["fields"]]


def check_first_columnar(files: list, fields: FieldMap) -> None:
    """ConfigError when the first Parquet or Avro shard lacks a column it must have (FieldMap.check): a wrong layout
    fails at once, with the columns the file has, instead of as every record counted bad (JSON Lines have no schema
    to check)."""
    from ..config import ConfigError

    first = next((f for f in files if is_columnar(f)), None)
    if first is None:
        return
    try:
        columns = shard_columns(first)
    except Exception as e:  # an unreadable first shard is bad input, counted when the scan meets it
        log.debug("could not read the columns of %s: %s", first, e)
        return
    try:
        fields.check(columns, str(first))
    except MissingColumns as e:
        raise ConfigError(str(e)) from None


class _Skip(Exception):
    """The whole file was counted bad (a missing column)."""


def _check_or_count(fields: FieldMap, have: list[str], path: Any, bad: Any, rows) -> None:
    """Count every row of a file without a column it must have as `missing_column` (one event, logged once), then
    skip the file; `rows` is called for the count only then (it may read the whole file)."""
    try:
        fields.check(have, str(path))
    except MissingColumns as e:
        n = rows()
        if n:
            bad.add("missing_column", f"{path}:1", str(e)[:300], count=n)
        raise _Skip from None


@dataclass
class _Progress:
    """How far a read got: rows read (or skipped by a resume), and the file's rows when its footer says."""

    read: int = 0
    total: int | None = None


_INVALID_UTF8 = object()  # a string value whose bytes are not UTF-8 (Arrow does not check them when reading)


def _good(row: int, record: dict[str, Any], path: Any, bad: Any) -> bool:
    """Whether a row has a string content and valid text; counted bad (by kind) when not."""
    if isinstance(record.get("content"), str) and _INVALID_UTF8 not in record.values():
        bad.good += 1
        return True
    if _INVALID_UTF8 in record.values():
        bad.add("invalid_utf8", f"{path}:{row + 1}", "a string value that is not UTF-8")
    else:
        bad.add("missing_content", f"{path}:{row + 1}", "no string 'content' field")
    return False


def _values(column: Any) -> list[Any]:
    """A column's Python values; a string column with invalid UTF-8 costs only the rows holding it."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        def text(raw: bytes | None) -> Any:
            try:
                return raw if raw is None else raw.decode("utf-8")
            except UnicodeDecodeError:
                return _INVALID_UTF8

        return [text(raw) for raw in column.cast(pa.large_binary()).to_pylist()]


def _parquet(fh, path: Any, bad: Any, fields: FieldMap, start_line: int, state: _Progress):
    import pyarrow.parquet as pq

    # pre_buffer (pyarrow's default) fetches every row group's column chunks at once: the whole file in memory
    pf = pq.ParquetFile(fh, pre_buffer=False)
    state.total = pf.metadata.num_rows
    have = pf.schema_arrow.names
    _check_or_count(fields, have, path, bad, lambda: pf.metadata.num_rows)
    pairs = fields.pairs(have)  # passthrough: BigQuery's columns only, never an extra TIMESTAMP or BYTES one
    read = list(dict.fromkeys(theirs for _, theirs in pairs))
    names = [ours for ours, _ in pairs]
    for group in range(pf.num_row_groups):
        # a row group at a time: a break costs the rows from its group on, and a resume skips whole groups unread
        if state.read + pf.metadata.row_group(group).num_rows <= start_line:
            state.read += pf.metadata.row_group(group).num_rows
            continue
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=read, use_threads=False):
            first = state.read
            # a column at a time into Python values, then rows zipped from them
            columns = [_values(batch.column(theirs)) for _, theirs in pairs]
            values = record = None
            for k, values in enumerate(zip(*columns)):
                record = dict(zip(names, values))
                if first + k >= start_line and _good(first + k, record, path, bad):
                    yield first + k, record
            state.read = first + batch.num_rows
            del batch, columns, values, record  # not alive while the next batch is read: one batch in memory


def _avro(fh, path: Any, bad: Any, fields: FieldMap, start_line: int, state: _Progress):
    import fastavro

    blocks = fastavro.block_reader(fh)
    have = [f["name"] for f in blocks.writer_schema["fields"]]
    _check_or_count(fields, have, path, bad, lambda: sum(block.num_records for block in blocks))
    pairs = fields.pairs(have)  # passthrough: BigQuery's columns only (its export makes TIMESTAMP a datetime)
    for block in blocks:  # a block is decoded as it is iterated: one block in memory at a time
        for record in block:
            row, state.read = state.read, state.read + 1
            record = {ours: record[theirs] for ours, theirs in pairs}
            if row >= start_line and _good(row, record, path, bad):
                yield row, record


def iter_columnar(path: str | Path, bad: Any, fields: FieldMap, start_line: int = 0
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row, record) from a Parquet or Avro shard, with our field names; bad input skipped and counted."""
    reader = _parquet if str(path).endswith(PARQUET) else _avro
    state = _Progress()  # where a break is reported, and how many rows it cost
    try:
        with _open(path) as fh:
            yield from reader(fh, path, bad, fields, start_line, state)
    except _Skip:
        return
    except TooManyBadRecords:
        raise
    except FileNotFoundError as e:
        bad.add("unreadable_file", str(path), str(e)[:80])
    except Exception as e:  # pyarrow's ArrowInvalid/OSError, fastavro's EOFError/ValueError, a remote read cut off
        bad.add("truncated_or_corrupt_file", f"{path}:{state.read + 1}", f"{type(e).__name__}: {e}"[:120])
        _count_rows_after(path, bad, state, start_line)


def _count_rows_after(path: Any, bad: Any, state: _Progress, start_line: int) -> None:
    """Count the rows past a break that the footer says the file holds, as one `rows_after_damage` event: the break
    itself counted the row where it happened, so the file's bad records are the rows not read."""
    if state.total is None:  # no footer read (a truncated Parquet file), or Avro: the count is unknown
        return
    after = state.total - max(state.read, start_line) - 1  # a resume's rows before start_line were counted then
    if after > 0:
        bad.add("rows_after_damage", f"{path}:{state.read + 2}-{state.total}",
                "rows the footer lists after the break, not read", count=after)


class ParquetShardWriter:
    """Records as numbered `file-000000000000.parquet` shards of string columns, a new shard every
    `shard_records` (export-local --format parquet): the same records as the JSON Lines export, so `prepare` makes
    the same clean/ of either."""

    def __init__(self, directory: str | Path, shard_records: int, row_group_rows: int = 1000) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_records, self.row_group_rows = max(1, shard_records), row_group_rows
        self.n_shards = self.n_records = 0
        self._rows: list[dict[str, Any]] = []
        self._writer = None
        self._in_shard = 0

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (every value a string), starting a new shard every `shard_records`."""
        if self._writer is None or self._in_shard >= self.shard_records:
            self._roll(record)
        self._rows.append(record)
        self._in_shard += 1
        self.n_records += 1
        if len(self._rows) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._writer.schema),
                                     row_group_size=self.row_group_rows)
            self._rows = []

    def _roll(self, record: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.close()
        schema = pa.schema([(name, pa.string()) for name in record])
        self._writer = pq.ParquetWriter(self.directory / f"file-{self.n_shards:012d}.parquet", schema)
        self.n_shards += 1
        self._in_shard = 0

    def close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ParquetShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
