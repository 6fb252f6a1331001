"""Export shards: the local exporter, the shard lister, the skipping reader and its bad-record policy."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from codeparrot.corpus.export import export_local
from codeparrot.corpus.source import (RAW_FIELDS, BadRecords, ShardWriter, TooManyBadRecords, iter_records,
                                      iter_shard, list_shards, parse_record, record_line)
from codeparrot.pipeline import run_export_local

from conftest import EXPORT_SHARD_RECORDS, ROOT_NAME, read_all, top_of, write_jsonl


def _shard_lines(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).splitlines()


def _good(i: int) -> dict:
    return {"repo_name": f"r/{i}", "path": f"m{i}.py", "content": f"x = {i}\n"}


# ---------------------------------------------------------------- export-local


def test_export_fields_and_content(raw_export, stdlib_root, stdlib_files):
    raw, result = raw_export
    assert result["skipped"] is False
    assert result["files"] == len(stdlib_files)
    records = read_all(raw)
    assert len(records) == len(stdlib_files)
    for r in records:
        assert set(r) == set(RAW_FIELDS)
        assert r["repo_name"] == f"{ROOT_NAME}/{top_of(r['path'])}"
        data = (stdlib_root / r["path"]).read_bytes()
        assert r["content"] == data.decode("utf-8")
        assert r["size"] == str(len(data)) and r["copies"] == "1"  # BigQuery's INT64-as-string
        assert r["license"] == "psf-2.0"
    # sorted walk order, several repositories
    assert len({r["repo_name"] for r in records}) >= 5
    assert sorted(r["path"] for r in records) == sorted(stdlib_files)


def test_export_shard_size_respected(raw_export, stdlib_files):
    raw, result = raw_export
    shards = list_shards(raw)
    assert [s.name for s in shards] == [f"file-{i:012d}.json.gz" for i in range(len(shards))]
    n = len(stdlib_files)
    assert len(shards) == result["shards"] == -(-n // EXPORT_SHARD_RECORDS)
    sizes = [len(_shard_lines(s)) for s in shards]
    assert all(size == EXPORT_SHARD_RECORDS for size in sizes[:-1])
    assert 0 < sizes[-1] <= EXPORT_SHARD_RECORDS
    assert sum(sizes) == n
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["stage"] == "export-local" and manifest["counts"]["files"] == n


def test_export_is_deterministic(tmp_path, stdlib_root, raw_export):
    a = export_local(tmp_path / "a", [str(stdlib_root)], shard_records=EXPORT_SHARD_RECORDS)
    b = export_local(tmp_path / "b", [str(stdlib_root)], shard_records=EXPORT_SHARD_RECORDS)
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert _shard_lines(tmp_path / "a" / name) == _shard_lines(tmp_path / "b" / name)
        assert _shard_lines(tmp_path / "a" / name) == _shard_lines(raw_export[0] / name)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_export_skips_non_utf8_and_empty(tmp_path, stdlib_root, stdlib_files):
    root = tmp_path / "mixed"
    for rel in stdlib_files[:3]:
        (root / "pkg").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stdlib_root / rel, root / "pkg" / Path(rel).name)
    (root / "latin1.py").write_bytes("# caf\xe9\nname = 'caf\xe9'\n".encode("latin-1"))
    (root / "empty.py").write_bytes(b"")
    (root / "blank.py").write_text("\n   \n")
    (root / "notes.txt").write_text("not python")
    stats = export_local(tmp_path / "out", [str(root)], shard_records=10)
    assert stats.files == 3
    assert stats.skipped_not_utf8 == 1
    assert stats.skipped_empty == 2
    assert stats.skipped_unreadable == 0
    records = read_all(tmp_path / "out")
    assert {r["path"] for r in records} == {f"pkg/{Path(rel).name}" for rel in stdlib_files[:3]}
    assert {r["repo_name"] for r in records} == {"mixed/pkg"}
    # the stage function records the same counts in its manifest
    result = run_export_local(tmp_path / "raw", [str(root)], shard_records=10)
    assert result["skipped_not_utf8"] == 1 and result["skipped_empty"] == 2 and result["files"] == 3


def test_export_max_files_over_several_roots(tmp_path, stdlib_root):
    roots = [str(p) for p in sorted(stdlib_root.iterdir()) if p.is_dir()][:3]
    assert len(roots) == 3
    stats = export_local(tmp_path / "out", roots, shard_records=100, max_files=2)
    assert stats.files == 2
    assert len(read_all(tmp_path / "out")) == 2


def test_run_export_local_skips_when_up_to_date(tmp_path, stdlib_root):
    out = tmp_path / "raw"
    first = run_export_local(out, [str(stdlib_root)], shard_records=EXPORT_SHARD_RECORDS)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    second = run_export_local(out, [str(stdlib_root)], shard_records=EXPORT_SHARD_RECORDS)
    assert first["skipped"] is False and second["skipped"] is True
    assert second["files"] == first["files"]
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    third = run_export_local(out, [str(stdlib_root)], shard_records=EXPORT_SHARD_RECORDS + 1)
    assert third["skipped"] is False


def test_export_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        export_local(tmp_path / "out", [str(tmp_path / "nowhere")])


# ---------------------------------------------------------------- list_shards


@pytest.fixture
def four_formats(tmp_path) -> Path:
    d = tmp_path / "shards"
    write_jsonl(d / "a.json", [_good(0), _good(1)])
    write_jsonl(d / "b.jsonl", [_good(2)])
    write_jsonl(d / "c.json.gz", [_good(3), _good(4)])
    write_jsonl(d / "sub" / "d.jsonl.gz", [_good(5)])
    (d / "manifest.json").write_text(json.dumps({"stage": "x"}))
    (d / "report.json").write_text(json.dumps({"files": 1}))
    (d / "notes.txt").write_text("not a shard")
    return d


def test_list_shards_directory_glob_file(four_formats):
    d = four_formats
    expected = [d / "a.json", d / "b.jsonl", d / "c.json.gz", d / "sub" / "d.jsonl.gz"]
    assert list_shards(d) == expected
    assert list_shards(str(d)) == expected
    assert list_shards(f"{d}/**/*.json*") == expected  # manifest.json / report.json left out
    assert list_shards(f"{d}/*") == expected[:3]
    assert list_shards(d / "c.json.gz") == [d / "c.json.gz"]
    assert list_shards([d / "b.jsonl", d, f"{d}/a.*"]) == expected  # union, deduplicated, sorted
    contents = [r["content"] for r in read_all(d)]
    assert contents == [_good(i)["content"] for i in range(6)]


def test_list_shards_nothing_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        list_shards(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        list_shards(f"{tmp_path}/*.json.gz")
    assert list_shards(tmp_path) == []


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("suffix", [".jsonl", ".json.gz"])
@pytest.mark.parametrize("bad_line, kind", [
    (b'{"repo_name": "x", "content": "unterminated', "invalid_json"),
    (b"not json at all", "invalid_json"),
    (b'{"repo_name": "x", "path": "a.py"}', "missing_content"),
    (b'{"repo_name": "x", "content": 123}', "missing_content"),
    (b'{"repo_name": "x", "content": null}', "missing_content"),
    (b"[1, 2, 3]", "missing_content"),
    (b'{"repo_name": "x", "content": "caf\xe9 \xff\xfe"}', "invalid_utf8"),
])
def test_bad_line_skipped_and_counted(tmp_path, suffix, bad_line, kind):
    shard = write_jsonl(tmp_path / f"shard{suffix}", [_good(0), _good(1), bad_line, b"", _good(2)])
    bad = BadRecords()
    got = list(iter_shard(shard, bad))
    assert [line for line, _ in got] == [0, 1, 4]
    assert [r["content"] for _, r in got] == [_good(i)["content"] for i in range(3)]
    assert bad.counts == {kind: 1}
    assert bad.good == 3
    assert bad.as_dict() == {"good": 3, "bad": 1, "bad_by_kind": {kind: 1}}


def test_truncated_gzip_keeps_records_before_the_cut(tmp_path, stdlib_root, stdlib_files):
    records = [{"repo_name": "r", "path": rel, "content": (stdlib_root / rel).read_text()} for rel in stdlib_files]
    full = write_jsonl(tmp_path / "full.json.gz", records)
    cut = tmp_path / "cut.json.gz"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    after = write_jsonl(tmp_path / "z_after.jsonl", [_good(9)])
    bad = BadRecords()
    got = list(iter_records([cut, after], bad))
    assert bad.counts == {"truncated_or_corrupt_file": 1}
    # a prefix of the records survives, then the next file is read as usual: every line the gzip module decodes
    # before the cut (ISA-L's reader, which decompresses ahead in blocks, hands over to it at the damage)
    assert 0 < len(got) - 1 < len(records)
    before_cut = []
    with pytest.raises(EOFError):
        with gzip.open(cut, "rb") as fh:
            before_cut.extend(fh)
    assert len(got) - 1 == len(before_cut)
    assert got[:-1] == records[: len(got) - 1]
    assert got[-1]["content"] == _good(9)["content"]


def test_corrupt_gzip_counted(tmp_path):
    garbage = tmp_path / "garbage.json.gz"
    garbage.write_bytes(b"this is not gzip data at all\n" * 10)
    good = write_jsonl(tmp_path / "good.jsonl", [_good(1)])
    bad = BadRecords()
    got = list(iter_records([garbage, good], bad))
    assert [r["content"] for r in got] == [_good(1)["content"]]
    assert bad.counts == {"truncated_or_corrupt_file": 1}


def test_empty_files_yield_nothing(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [_good(0)])
    empty_gz = tmp_path / "b.json.gz"
    empty_gz.write_bytes(b"")
    empty_jsonl = tmp_path / "c.jsonl"
    empty_jsonl.write_bytes(b"")
    last = write_jsonl(tmp_path / "d.json.gz", [_good(1)])
    assert list_shards(tmp_path) == [first, empty_gz, empty_jsonl, last]
    bad = BadRecords()
    got = [r["content"] for r in iter_records(list_shards(tmp_path), bad)]
    assert got == [_good(0)["content"], _good(1)["content"]]
    assert bad.total_bad == 0 and bad.good == 2


def test_unreadable_files_counted(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [_good(0)])
    dir_gz = tmp_path / "b.json.gz"
    dir_gz.mkdir()  # named like a shard, but open() raises IsADirectoryError
    dir_plain = tmp_path / "c.jsonl"
    dir_plain.mkdir()
    dangling = tmp_path / "d.jsonl.gz"
    os.symlink(tmp_path / "does-not-exist", dangling)
    last = write_jsonl(tmp_path / "e.json", [_good(1)])
    bad = BadRecords()
    got = [r["content"] for r in iter_records([first, dir_gz, dir_plain, dangling, last], bad)]
    assert got == [_good(0)["content"], _good(1)["content"]]
    assert bad.counts == {"unreadable_file": 3}


def test_too_many_bad_records_raises_midway(tmp_path):
    lines = []
    for i in range(250):
        lines += [_good(i), b"{broken"]
    shard = write_jsonl(tmp_path / "half.json.gz", lines)
    bad = BadRecords(max_ratio=0.1)
    n = 0
    with pytest.raises(TooManyBadRecords) as e:
        for _ in iter_records([shard], bad):
            n += 1
    msg = str(e.value)
    assert "corpus.max_bad_ratio=0.1" in msg and "invalid_json" in msg
    assert n < 250  # stopped while reading, not at the end
    ok = BadRecords(max_ratio=1.0)
    assert len(list(iter_records([shard], ok))) == 250
    assert ok.counts == {"invalid_json": 250}
    ok.check(final=True)  # no raise


def test_ratio_judged_at_the_end_on_small_inputs(tmp_path):
    shard = write_jsonl(tmp_path / "small.jsonl", [_good(0), b"{", _good(1), b"{"])
    bad = BadRecords(max_ratio=0.1)
    assert len(list(iter_records([shard], bad))) == 2  # below min_records: no verdict yet
    with pytest.raises(TooManyBadRecords, match="2 of 4 records were bad"):
        bad.check(final=True)
    lenient = BadRecords(max_ratio=0.5)
    list(iter_records([shard], lenient))
    lenient.check(final=True)  # exactly at the ratio: allowed


def test_urls_are_read_through_fsspec_with_the_same_rules(tmp_path, stdlib_root, stdlib_files):
    """A file:// URL goes through fsspec like hf:// or gs:// would: listed by glob, read line by line, and a shard
    cut off mid-file keeps its records before the cut and counts the break."""
    export_local(tmp_path / "raw", [str(stdlib_root)], shard_records=EXPORT_SHARD_RECORDS)
    local = list_shards(tmp_path / "raw")
    urls = list_shards(f"file://{tmp_path / 'raw'}/*.json.gz")
    assert [u.rsplit("/", 1)[1] for u in urls] == [p.name for p in local] and urls[0].startswith("file://")
    bad = BadRecords(max_ratio=1.0)
    assert list(iter_records(urls, bad)) == read_all(local) and bad.total_bad == 0
    cut = tmp_path / "cut.json.gz"
    data = local[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    bad = BadRecords(max_ratio=1.0)
    records = list(iter_records([f"file://{cut}"], bad))
    assert 0 < len(records) < EXPORT_SHARD_RECORDS and bad.counts == {"truncated_or_corrupt_file": 1}
    with pytest.raises(FileNotFoundError, match="no shards found"):
        list_shards(f"file://{tmp_path}/nothing/*.json.gz")


# ------------------------------------------------------------ fast JSON lines


TRICKY_LINES = [
    b'{"content": "x", "size": 123456789012345678901234567890}',  # past 64 bits: orjson would read a float
    b'{"content": "x", "copies": 1.5e300, "flag": true, "none": null}',
    b'{"content": "x", "v": NaN, "w": -Infinity}',  # json-module extensions, kept as they were read
    b'{"content": "a\\ud800b"}',  # an escaped lone surrogate: valid JSON, no UTF-8 writer takes it
    b'{"content": "\xc3\xa9t\xc3\xa9", "nested": {"n": [1, 2, 99999999999999999999]}}',
    b'{"content": "dup", "content": "last wins"}',
    b'["not", "a", "record"]',
]


@pytest.mark.parametrize("line", TRICKY_LINES)
def test_records_read_as_the_json_module_reads_them(line):
    assert repr(parse_record(line)) == repr(json.loads(line.decode("utf-8")))  # repr: NaN != NaN


@pytest.mark.parametrize("line", [b'{"content": "x", "v": 1e400', b"\xff\xfe", b'{"a": 1} trailing'])
def test_broken_lines_raise_what_the_json_module_raises(line):
    with pytest.raises(ValueError) as ours:  # UnicodeDecodeError is a ValueError too; iter_shard tells them apart
        parse_record(line)
    with pytest.raises(ValueError) as theirs:
        json.loads(line.decode("utf-8"))
    assert type(ours.value) is type(theirs.value) or isinstance(ours.value, json.JSONDecodeError)


@pytest.mark.parametrize("line", [l for l in TRICKY_LINES if b"ud800" not in l and l.startswith(b"{")])
def test_record_lines_round_trip_exactly(line):
    record = json.loads(line.decode("utf-8"))
    written = record_line(record)
    assert written.endswith(b"\n") and written.count(b"\n") == 1
    assert repr(json.loads(written)) == repr(record)


def test_a_lone_surrogate_is_refused_when_written():
    with pytest.raises(UnicodeEncodeError):
        record_line({"content": "a\ud800b"})


@pytest.mark.parametrize("level", [1, 6])
def test_shard_bytes_depend_on_the_lines_alone(tmp_path, stdlib_root, stdlib_files, level):
    """Records written whole or as their lines (how the pool and the datatrove tasks write) give the same files;
    levels 0-3 use ISA-L, 4-9 zlib, and the gzip module reads both."""
    records = [{"path": rel, "content": (stdlib_root / rel).read_text()} for rel in stdlib_files]
    per_shard = -(-len(records) // 3)
    with ShardWriter(tmp_path / "a", per_shard, level) as a, ShardWriter(tmp_path / "b", per_shard, level) as b:
        for record in records:
            a.write(record)
            b.write_line(record_line(record))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 3 and files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    back = [json.loads(line) for f in files for line in gzip.open(tmp_path / "a" / f)]
    assert back == records


def test_export_local_writes_parquet_holding_the_same_records(tmp_path, stdlib_root, raw_export):
    from codeparrot.cli import main

    assert main(["export-local", str(tmp_path / "raw"), "--root", str(stdlib_root), "--shard-records",
                 str(EXPORT_SHARD_RECORDS), "--format", "parquet"]) == 0
    shards = list_shards(tmp_path / "raw")
    assert [s.name for s in shards] == [p.name.replace(".json.gz", ".parquet") for p in list_shards(raw_export[0])]
    assert read_all(shards) == read_all(raw_export[0])
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["config"]["corpus"]["export_format"] == "parquet"
    again = run_export_local(tmp_path / "raw", [str(stdlib_root)], EXPORT_SHARD_RECORDS, fmt="parquet")
    assert again["skipped"] is True  # and a JSON Lines export is another artifact:
    assert run_export_local(tmp_path / "raw", [str(stdlib_root)], EXPORT_SHARD_RECORDS)["skipped"] is False


def test_list_shards_takes_every_format_mixed(tmp_path):
    names = ["a.json.gz", "b.parquet", "c.avro", "d.jsonl", "notes.txt", "e.parquet.crc"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path)] == ["a.json.gz", "b.parquet", "c.avro", "d.jsonl"]
