"""The real command line, run as a subprocess: summaries, exit codes, clear errors, resumable pipeline."""
from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codeparrot.artifacts import read_manifest
from codeparrot.config import describe_config, load_config, section_summary

from conftest import EXPORT_SHARD_RECORDS, SUBPROCESS_ENV, VALID_FRACTION, free_port, read_all, summaries

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# Keep a training stage (when the pipeline has one) down to a few tiny steps.
TINY_TRAIN = ["train.max_steps=2", "train.eval_interval=1", "train.save_interval=2", "eval.max_batches=1",
              "data.seq_length=32", "train.micro_batch_size=2",
              # tiny.yaml fine-tunes too: records truncated to the 32-token context, a short instruction tuning
              "sft.max_record_tokens=0", "sft.max_records=8", "sft.epochs=1", "sft.batch_size=2", "sft.max_new_tokens=4"]


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


@pytest.mark.slow
def test_pipeline_runs_then_skips(tmp_path, stdlib_root, stdlib_files, split_seed):
    work = tmp_path / "work"
    args = ["pipeline", "--config", TINY, *small_overrides(work, split_seed), f"corpus.local_roots={stdlib_root}",
            "corpus.source=local", "data.pretokenized=false", *TINY_TRAIN]  # the streaming path end to end
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
    assert list(stages)[-1] == "sft" and (work / "runs" / "sft" / "final" / "model.safetensors").is_file()

    second = cli(*args, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    again = summaries(second.stdout)
    assert list(again) == list(stages)
    assert all(s.get("skipped") == "True" for s in again.values()), again
    assert again["prepare"]["train_files"] == stages["prepare"]["train_files"]


def test_stage_help_lists_the_config_sections_it_reads():
    prepare = cli("prepare", "--help")
    assert prepare.returncode == 0
    epilog = prepare.stdout.split("config sections read", 1)[1]
    sections = {line.split(":")[0].strip() for line in epilog.splitlines()[1:] if line.strip()}
    assert sections == {"paths (clean, raw)", "corpus"}
    assert section_summary("corpus").split(": ", 1)[1] in epilog
    tokenizer = cli("train-tokenizer", "--help").stdout
    assert "corpus (max_bad_ratio):" in tokenizer and "tokenizer:" in tokenizer
    assert "model" not in tokenizer and "data" not in tokenizer.split("config sections read", 1)[1]
    train = cli("train", "--help").stdout.split("config sections read", 1)[1]
    for line in ("model:", "data:", "train:", "eval:", "paths:", "tokenizer (eos_token):"):
        assert "\n  " + line in train, line
    evaluate = cli("evaluate", "--help").stdout
    assert "train (mixed_precision, seed):" in evaluate and "model" not in evaluate.split("config sections", 1)[1]


def test_config_prints_the_resolved_tree():
    p = cli("config", "--config", TINY, "train.max_steps=7", "corpus.num_proc=3")
    assert p.returncode == 0, p.stderr
    assert p.stdout == describe_config(load_config(TINY, ["train.max_steps=7", "corpus.num_proc=3"]))
    assert re.search(r"^  max_steps +int +7 ", p.stdout, re.M) and re.search(r"^  num_proc +int +3 ", p.stdout, re.M)
    bad = cli("config", "train.max_steps=many")
    assert bad.returncode == 2 and "integer" in bad.stderr and "Traceback" not in bad.stderr


def test_config_names_are_found_from_any_directory(tmp_path):
    """Finding: `--config tiny` "does not exist", and `--config configs/tiny.yaml` failed outside the checkout."""
    expected = describe_config(load_config(TINY))
    for name in ("tiny", "configs/tiny.yaml"):
        p = subprocess.run([sys.executable, "-m", "codeparrot", "config", "--config", name], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert p.returncode == 0 and p.stdout == expected, p.stderr
    assert "configs/tiny.yaml, from any directory" in " ".join(cli("config", "--help").stdout.split())


def test_a_generate_flag_outside_its_range_is_one_line_naming_the_flag():
    p = cli("generate", "-p", "x", "--top-p", "2")
    assert (p.returncode, p.stderr) == (2, "codeparrot generate: error: --top-p must be greater than 0 and at most 1, "
                                           "got 2.0\n")


def _file_size_limit(limit: int):
    """A preexec_fn: files may not grow past `limit` bytes; a write past it fails with EFBIG, as on a full disk."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action would kill the process instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("num_proc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_full_disk_stops_prepare_with_one_line_and_no_partial_artifact(tmp_path, raw_export, split_seed,
                                                                         num_proc):
    work = tmp_path / "work"
    args = ["prepare", *small_overrides(work, split_seed), f"paths.raw={raw_export[0]}", "corpus.filters=",
            f"corpus.num_proc={num_proc}"]
    p = subprocess.run([sys.executable, "-m", "codeparrot", *map(str, args)], capture_output=True, text=True,
                       timeout=120, cwd=REPO, preexec_fn=_file_size_limit(8192))
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if "rror" in line]
    assert errors == [f"codeparrot prepare: error: no space left writing {work / 'clean'} (File too large)"], \
        p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    # neither clean/ nor clean.tmp/; the tasks' work dir stays for a resume once there is space
    assert sorted(p.name for p in work.iterdir()) == ["clean.work"]


@pytest.mark.slow
def test_pipeline_under_accelerate_launch_runs_the_data_stages_once(tmp_path, stdlib_root, split_seed):
    """Two real CPU processes: rank 0 writes each artifact once while rank 1 waits; both train and evaluate."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "codeparrot", "pipeline", "--config", str(TINY),
           *small_overrides(work, split_seed), f"corpus.local_roots={stdlib_root}", "corpus.source=local",
           *TINY_TRAIN]
    env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    artifacts = ("raw", "clean", "tokenizer", "tokens")  # tiny.yaml trains from token shards
    first_seen: dict[str, int] = {}  # the inode of each artifact directory when its manifest first appeared
    while proc.poll() is None and len(first_seen) < len(artifacts):
        for name in artifacts:
            if name not in first_seen and (work / name / "manifest.json").is_file():
                first_seen[name] = (work / name).stat().st_ino
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    # A stage that ran again on rank 1 would have swapped in a new directory (a new inode).
    assert first_seen == {name: (work / name).stat().st_ino for name in artifacts}
    for name in ("export-local", "prepare", "train-tokenizer", "pretokenize"):
        assert len(re.findall(rf"INFO codeparrot.stage: {name}: wrote ", stderr)) == 1, name
    assert not list(work.glob("*.tmp")) and not list(work.glob("*.old"))
    logs = work / "runs" / "tiny" / "logs"
    assert [json.loads((logs / f"rank{r}.json").read_text())["world_size"] for r in (0, 1)] == [2, 2]
    assert list(summaries(stdout)) == ["export-local", "prepare", "train-tokenizer", "pretokenize", "sft-data",
                                       "train", "evaluate", "humaneval", "sft"]
    assert summaries(stdout)["sft"]["processes"] == "2"
    assert len(re.findall(r"INFO codeparrot.stage: sft-data: wrote ", stderr)) == 1  # rank 0 only
    # tiny.yaml scores 3 HumanEval problems; none fits this 32-token context, so each is a counted skip
    report = json.loads((work / "runs" / "tiny" / "humaneval" / "step-2" / "pass_at_k.json").read_text())
    assert report["processes"] == 2 and report["problems"] == report["problems_skipped"] == 3
    assert (work / "runs" / "tiny" / "eval" / "step-2.json").is_file()
