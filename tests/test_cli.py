"""The real command line, run as a subprocess: summaries, exit codes, clear errors, resumable pipeline."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from codeparrot.artifacts import read_manifest

from conftest import EXPORT_SHARD_RECORDS, VALID_FRACTION, read_all, summaries

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# Keep a training stage (when the pipeline has one) down to a few tiny steps.
TINY_TRAIN = ["train.max_steps=2", "train.eval_interval=1", "train.save_interval=2", "eval.max_batches=1",
              "data.seq_length=32", "train.micro_batch_size=2"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codeparrot", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def small_overrides(workdir: Path, split_seed: int) -> list[str]:
    return [f"paths.workdir={workdir}", "tokenizer.vocab_size=600", "tokenizer.n_examples=200",
            "tokenizer.report_valid_files=50", f"corpus.valid_fraction={VALID_FRACTION}",
            f"corpus.split_seed={split_seed}", f"corpus.export_shard_records={EXPORT_SHARD_RECORDS}"]


def test_export_local_prints_summary(tmp_path, stdlib_root, stdlib_files):
    out = tmp_path / "raw"
    p = cli("export-local", out, "--root", stdlib_root, "--shard-records", "20")
    assert p.returncode == 0, p.stderr
    s = summaries(p.stdout)["export-local"]
    assert s["files"] == str(len(stdlib_files)) and s["shards"] == str(-(-len(stdlib_files) // 20))
    assert s["skipped"] == "False"
    assert len(read_all(out)) == len(stdlib_files)
    again = cli("export-local", out, "--root", stdlib_root, "--shard-records", "20")
    assert again.returncode == 0 and summaries(again.stdout)["export-local"]["skipped"] == "True"


def test_prepare_with_config_file(tmp_path, raw_export, split_seed):
    p = cli("prepare", "--config", TINY, *small_overrides(tmp_path / "work", split_seed), f"paths.raw={raw_export[0]}")
    assert p.returncode == 0, p.stderr
    s = summaries(p.stdout)["prepare"]
    assert s["skipped"] == "False" and int(s["train_files"]) > 0
    assert int(s["files_in"]) == raw_export[1]["files"]
    manifest = read_manifest(tmp_path / "work" / "clean")
    assert manifest["counts"]["train_files"] == int(s["train_files"])
    assert manifest["config"]["corpus"]["valid_fraction"] == VALID_FRACTION  # override beat tiny.yaml's 0.05


def test_bad_override_exits_2_naming_keys(tmp_path):
    p = cli("prepare", "--config", TINY, f"paths.workdir={tmp_path}", "train.nope=1")
    assert p.returncode == 2
    assert "train.nope" in p.stderr and "valid keys" in p.stderr and "max_steps" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli("train-tokenizer", "nosuch.key=1")
    assert p.returncode == 2 and "valid sections" in p.stderr and "Traceback" not in p.stderr
    p = cli("prepare", "train.max_steps=abc")
    assert p.returncode == 2 and "integer" in p.stderr and "Traceback" not in p.stderr


def test_missing_raw_is_a_clear_error(tmp_path):
    raw = tmp_path / "no-such-export"
    p = cli("prepare", "--config", TINY, f"paths.workdir={tmp_path}", f"paths.raw={raw}")
    assert p.returncode == 2
    assert str(raw) in p.stderr and "error" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli("pipeline", f"paths.workdir={tmp_path}", "corpus.source=path", f"paths.raw={raw}")
    assert p.returncode == 2 and str(raw) in p.stderr and "Traceback" not in p.stderr
    p = cli("prepare", "--config", tmp_path / "missing.yaml")
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_pipeline_runs_then_skips(tmp_path, stdlib_root, stdlib_files, split_seed):
    work = tmp_path / "work"
    args = ["pipeline", "--config", TINY, *small_overrides(work, split_seed), f"corpus.local_roots={stdlib_root}",
            "corpus.source=local", *TINY_TRAIN]
    first = cli(*args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = summaries(first.stdout)
    assert list(stages)[:3] == ["export-local", "prepare", "train-tokenizer"]
    assert all(s.get("skipped", "False") == "False" for s in stages.values()), stages
    assert stages["export-local"]["files"] == str(len(stdlib_files))
    assert int(stages["prepare"]["files_in"]) == len(stdlib_files)
    assert (work / "raw" / "manifest.json").is_file()
    assert (work / "clean" / "train").is_dir() and (work / "clean" / "valid").is_dir()
    assert (work / "tokenizer" / "tokenizer.json").is_file()
    assert read_manifest(work / "tokenizer")["inputs"]["clean"] == read_manifest(work / "clean")["fingerprint"]

    second = cli(*args, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    again = summaries(second.stdout)
    assert list(again) == list(stages)
    assert all(s.get("skipped") == "True" for s in again.values()), again
    assert again["prepare"]["train_files"] == stages["prepare"]["train_files"]
