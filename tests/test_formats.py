"""Parquet and Avro shards: the same records as JSON Lines, bad input counted by kind, hf:// streamed."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest

from codeparrot.corpus.fields import FieldMap
from codeparrot.corpus.formats import ParquetShardWriter, shard_columns
from codeparrot.corpus.source import BadRecords, iter_shard, list_shards

from conftest import SUBPROCESS_ENV, read_all, write_avro, write_jsonl, write_parquet

FIELDS = ("repo_name", "path", "copies", "size", "content", "license")


def _rows(path, bad=None) -> list:
    return list(iter_shard(path, bad if bad is not None else BadRecords()))


def _records(n: int, offset: int = 0) -> list[dict]:
    return [{"repo_name": f"r/{i}", "path": f"m{i}.py", "copies": "1", "size": "9", "content": f"x = {i}\n",
             "license": "mit"} for i in range(offset, offset + n)]


def test_every_format_reads_the_same_records(tmp_path, raw_export):
    records = read_all(raw_export[0])
    shards = [write_jsonl(tmp_path / "a.jsonl.gz", records), write_parquet(tmp_path / "a.parquet", records,
                                                                          row_group_size=7),
              write_avro(tmp_path / "a.avro", records)]
    jsonl, parquet, avro = (_rows(s) for s in shards)
    assert len(jsonl) == len(records) and parquet == jsonl and avro == jsonl  # rows numbered as lines
    assert list(parquet[0][1]) == list(FIELDS)  # the columns' order is the records' keys' order
    assert list_shards(tmp_path) == sorted(shards)
    assert shard_columns(shards[1]) == shard_columns(shards[2]) == list(FIELDS)


def test_parquet_export_writer_holds_the_json_records(tmp_path, raw_export):
    records = read_all(raw_export[0])
    with ParquetShardWriter(tmp_path / "p", shard_records=20, row_group_rows=6) as writer:
        for record in records:
            writer.write(record)
    names = [p.name for p in list_shards(tmp_path / "p")]
    assert names == [f"file-{i:012d}.parquet" for i in range(-(-len(records) // 20))]
    assert read_all(tmp_path / "p") == records


def _corrupt_middle(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "avro"])
def test_bad_input_is_counted_by_kind(tmp_path, fmt):
    """A truncated file, null and non-string contents and a missing column: each skipped and counted by kind."""
    string, nullable_long = ["null", "string"], ["null", "long"]
    if fmt == "parquet":
        write = lambda name, records, schema=None: write_parquet(tmp_path / f"{name}.parquet", records, schema)  # noqa
        numbers = pa.schema([(k, pa.int64() if k == "content" else pa.string()) for k in FIELDS])
    else:
        write = lambda name, records, schema=None: write_avro(tmp_path / f"{name}.avro", records, schema)  # noqa
        numbers = [{"name": k, "type": nullable_long if k == "content" else string} for k in FIELDS]
    good = write("a_good", _records(5))
    whole = write("b_truncated", _records(300, 5))
    whole.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    write("c_null", _records(2, 400) + [{**r, "content": None} for r in _records(3, 402)])
    write("d_numbers", [{**r, "content": 7} for r in _records(4, 500)], numbers)
    write("e_no_content", [{k: v for k, v in r.items() if k != "content"} for r in _records(6, 600)])
    bad = BadRecords()
    got = [r["repo_name"] for f in list_shards(tmp_path) for _, r in iter_shard(f, bad)]
    assert bad.counts["missing_content"] == 3 + 4 and bad.counts["missing_column"] == 6
    assert bad.counts["truncated_or_corrupt_file"] == 1
    kept_before_cut = len(got) - 7  # Avro keeps the blocks before the cut; a Parquet file without footer keeps none
    assert got[:5] == [f"r/{i}" for i in range(5)] and got[-2:] == ["r/400", "r/401"]
    assert kept_before_cut == 0 if fmt == "parquet" else 0 < kept_before_cut < 300
    assert bad.good == len(got) and _rows(good) == _rows(good)


@pytest.mark.parametrize("fmt", ["parquet", "avro"])
def test_a_break_mid_file_keeps_the_rows_before_it(tmp_path, fmt):
    if fmt == "parquet":
        shard = _broken_parquet(tmp_path / "a.parquet", 400, 3)
    else:
        records = [{**r, "content": f"value_{r['repo_name']} = 1\n" * 40} for r in _records(400)]  # compressed
        shard = _corrupt_middle(write_avro(tmp_path / "a.avro", records))
    bad = BadRecords()
    rows = _rows(shard, bad)
    # Parquet's footer counts the rows after the break; Avro's header has no count, so its break counts once
    after = {"rows_after_damage": 400 - len(rows) - 1} if fmt == "parquet" else {}
    assert 50 <= len(rows) < 400 and bad.counts == {"truncated_or_corrupt_file": 1, **after}
    assert [line for line, _ in rows] == list(range(len(rows)))


def _broken_parquet(path: Path, rows: int, group: int) -> Path:
    """A Parquet shard of `rows` rows in row groups of 50 whose row group `group` cannot be read (its footer can):
    the page header of that group's content, a break Arrow meets mid-file."""
    import pyarrow.parquet as pq

    write_parquet(path, [{**r, "content": f"value_{r['repo_name']} = 1\n" * 40} for r in _records(rows)],
                  row_group_size=50)  # compressed pages
    at = pq.ParquetFile(path).metadata.row_group(group).column(FIELDS.index("content")).data_page_offset
    data = bytearray(path.read_bytes())
    data[at:at + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


def test_rows_after_a_parquet_break_weigh_in_the_bad_ratio(tmp_path, caplog):
    """250 of 400 rows lost to a break in row group 3: past max_bad_ratio, though one record was counted before."""
    from codeparrot.corpus.source import TooManyBadRecords

    shard = _broken_parquet(tmp_path / "a.parquet", 400, 3)
    with caplog.at_level("WARNING", logger="codeparrot.corpus.source"):
        with pytest.raises(TooManyBadRecords, match="250 of 400 records"):
            _rows(shard, BadRecords(max_ratio=0.05))
    assert [r.message.split(" at ")[0] for r in caplog.records] == [  # one line per event, not per row
        "skipped truncated_or_corrupt_file", "skipped 249 rows_after_damage"]


def test_a_resumed_read_counts_the_rows_after_a_break_once(tmp_path):
    """A resume past the break's row group: no rows lost twice (the break's row group is skipped unread)."""
    shard = _broken_parquet(tmp_path / "a.parquet", 200, 1)
    bad = BadRecords()
    assert [line for line, _ in iter_shard(shard, bad, start_line=100)] == list(range(100, 200))
    assert bad.counts == {}
    bad = BadRecords()
    assert [line for line, _ in iter_shard(shard, bad, start_line=20)] == list(range(20, 50))
    assert bad.counts == {"truncated_or_corrupt_file": 1, "rows_after_damage": 149}


def test_invalid_utf8_in_a_parquet_value_costs_its_row_only(tmp_path):
    contents = pa.array([b"a = 1\n", b"caf\xe9 = 2\n", b"b = 3\n"], pa.binary()).view(pa.string())  # unchecked
    table = pa.table({k: contents if k == "content" else pa.array(["x"] * 3) for k in FIELDS})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "a.parquet")
    bad = BadRecords()
    assert [(line, r["content"]) for line, r in _rows(tmp_path / "a.parquet", bad)] == [(0, "a = 1\n"), (2, "b = 3\n")]
    assert bad.counts == {"invalid_utf8": 1}


@pytest.mark.parametrize("fmt", ["parquet", "avro"])
def test_passthrough_reads_only_bigquerys_columns(tmp_path, fmt):
    """A BigQuery export's extra TIMESTAMP, DATE, BYTES and NUMERIC columns are never read: the records hold the
    BigQuery columns the file has (here without license and copies), in its order, and are written as JSON."""
    import datetime
    import decimal

    from codeparrot.corpus.source import record_line

    extra = {"ts": datetime.datetime(2020, 1, 2, 3, 4, 5), "day": datetime.date(2020, 1, 2), "raw": b"\x00\x01",
             "n": decimal.Decimal("1.50")}
    records = [{"repo_name": f"r/{i}", "content": f"x = {i}\n", "path": f"m{i}.py", **extra} for i in range(3)]
    if fmt == "parquet":
        shard = write_parquet(tmp_path / "a.parquet", records)
    else:
        types = {"repo_name": "string", "content": "string", "path": "string",
                 "ts": {"type": "long", "logicalType": "timestamp-micros"},
                 "day": {"type": "int", "logicalType": "date"},
                 "raw": "bytes", "n": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}}
        shard = write_avro(tmp_path / "a.avro", records, [{"name": k, "type": t} for k, t in types.items()])
    bad = BadRecords()
    rows = _rows(shard, bad)
    assert [r for _, r in rows] == [{"repo_name": f"r/{i}", "content": f"x = {i}\n", "path": f"m{i}.py"}
                                    for i in range(3)]
    assert bad.counts == {} and all(record_line(r) for _, r in rows)


def test_a_bigquery_export_without_license_or_copies_is_read_as_its_json_lines(tmp_path):
    """Passthrough needs content and the fields the settings read, as JSON Lines do; a missing one is one line."""
    from codeparrot.config import ConfigError, load_config
    from codeparrot.corpus.formats import check_first_columnar

    records = [{k: v for k, v in r.items() if k not in ("license", "copies")} for r in _records(3)]
    shards = [write_parquet(tmp_path / "a.parquet", records), write_avro(tmp_path / "a.avro", records),
              write_jsonl(tmp_path / "a.jsonl", records)]
    fields = FieldMap.from_config(load_config(None, []).corpus)
    check_first_columnar(shards, fields)
    bad = BadRecords()
    assert [[r for _, r in iter_shard(shard, bad, fields=fields)] for shard in shards] == [records] * 3
    assert bad.counts == {}
    copies = FieldMap.from_config(load_config(None, ["corpus.quality_signal=copies"]).corpus)
    with pytest.raises(ConfigError, match=r"a.parquet has no column for copies \('copies'\) .*"
                                          r"its columns: repo_name, path, size, content\.") as e:
        check_first_columnar(shards, copies)
    assert "\n" not in str(e.value)


def test_a_layout_renames_and_projects_columns(tmp_path):
    records = [{"code": "x = 1\n", "repo_name": "a/b", "path": "x.py", "language": "Python", "license": "mit",
                "size": 6, "extra": [1, 2]}]
    fields = FieldMap((("repo_name", "repo_name"), ("content", "code"), ("language", "language")), False)
    for shard in (write_parquet(tmp_path / "g.parquet", records), write_jsonl(tmp_path / "g.jsonl", records),
                  write_avro(tmp_path / "g.avro", records, [{"name": k, "type": "string"} for k in
                                                           ("code", "repo_name", "path", "language")])):
        assert _rows_with(shard, fields) == [(0, {"repo_name": "a/b", "content": "x = 1\n", "language": "Python"})]


def _rows_with(shard, fields) -> list:
    return list(iter_shard(shard, BadRecords(), fields=fields))


# ---------------------------------------------------------------- hf:// streamed from the loopback Hub

TOKEN = "hf_formats_test_token"


@pytest.fixture
def remote_hub(tmp_path, monkeypatch):
    """The loopback Hub in a process of its own (its memory is not this process's); this process's
    huggingface_hub pointed at it."""
    from huggingface_hub import HfFileSystem, constants

    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "HF_HUB_OFFLINE"}
    server = subprocess.Popen([sys.executable, str(Path(__file__).parent / "loopback_hub.py"), str(tmp_path / "hub"),
                               TOKEN, "0"], stdout=subprocess.PIPE, text=True, env=env)
    endpoint = server.stdout.readline().strip()
    for name, value in (("ENDPOINT", endpoint), ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True),
                        ("HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    HfFileSystem.clear_instance_cache()
    yield endpoint
    HfFileSystem.clear_instance_cache()
    server.kill()
    server.wait()


def _peak_mb(url: str, fields: FieldMap) -> tuple[int, float]:
    """Rows read from `url` and the peak memory of reading them: Python's (tracemalloc) plus Arrow's pool."""
    pool, default = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        rows = sum(1 for _ in iter_shard(url, BadRecords(), fields=fields))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default)
    return rows, (peak + pool.max_memory()) / 1e6


def test_hf_parquet_is_streamed_with_flat_memory(tmp_path, remote_hub):
    from huggingface_hub import HfApi

    local = tmp_path / "local"
    for name, groups in (("small", 2), ("large", 20)):  # 1 and 10 MB in row groups of 500 kB (text is incompressible)
        write_parquet(local / f"{name}.parquet", [{**r, "content": os.urandom(500).hex()}
                                                  for r in _records(500 * groups)], row_group_size=500)
    api = HfApi(endpoint=remote_hub, token=TOKEN)
    api.create_repo("parrot/stack", repo_type="dataset")
    api.upload_folder(repo_id="parrot/stack", repo_type="dataset", folder_path=str(local), path_in_repo="data")
    urls = list_shards("hf://datasets/parrot/stack/data/*.parquet")
    assert urls == ["hf://datasets/parrot/stack/data/large.parquet", "hf://datasets/parrot/stack/data/small.parquet"]
    fields = FieldMap((("repo_name", "repo_name"), ("content", "content")), False)  # read as The Stack's would be
    (large_rows, large_mb), (small_rows, small_mb) = (_peak_mb(u, fields) for u in urls)
    assert (large_rows, small_rows) == (500 * 20, 500 * 2)
    large_file = (local / "large.parquet").stat().st_size / 1e6
    # a row group's column chunks (fetched, then decoded), whatever the file's size
    assert large_mb < small_mb + 0.5 and large_mb < large_file / 2, (small_mb, large_mb, large_file)
