"""A training process killed with SIGKILL resumes to exactly the batches and losses of an uninterrupted run.

Each run logs `data/batch_sha1` (a digest of every step's token ids, `train.record_batch_digests=true`) and
`train/loss` every step. A killed run's metrics.jsonl has lines past its last checkpoint; the resumed run logs
those steps again, so for each step the LAST logged value is the one compared.
"""
from __future__ import annotations

import email
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codeparrot.config import load_config
from codeparrot.corpus.prepare import run_prepare
from codeparrot.data.tokens import run_pretokenize
from codeparrot.pipeline import run_export_local
from codeparrot.tokenizer import run_train_tokenizer
from codeparrot.train import latest_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MAX_STEPS = 40
SAVE = 5
TINY = [
    "corpus.valid_fraction=0.3", "tokenizer.vocab_size=400", "tokenizer.n_examples=200",
    "data.seq_length=32", "data.num_of_sequences=8", "data.num_workers=2",
    "model.preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
    "train.micro_batch_size=4", "train.warmup_steps=2", "train.learning_rate=0.003", "train.trackers=",
    "train.log_interval=1", "train.eval_interval=10", f"train.save_interval={SAVE}", "train.keep_last=0",
    f"train.max_steps={MAX_STEPS}", "train.mixed_precision=no", "train.record_batch_digests=true",
    "eval.batch_size=4", "eval.max_batches=2",
]
MODES = {"streaming": ["data.pretokenized=false"], "pretokenized": ["data.pretokenized=true"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A prepared corpus (real stdlib packages email and json), its tokenizer and its token shards."""
    root = tmp_path_factory.mktemp("resume")
    run_export_local(root / "raw", [str(Path(email.__file__).parent), str(Path(json.__file__).parent)],
                     shard_records=10)
    cfg = load_config(None, [f"paths.workdir={root}", *TINY])
    run_prepare(cfg)
    run_train_tokenizer(cfg)
    run_pretokenize(cfg)
    return root


def _cmd(workdir: Path, run: str, mode: str) -> list[str]:
    return [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={workdir}", *TINY, *MODES[mode],
            f"train.run_name={run}"]


def _train(workdir: Path, run: str, mode: str) -> str:
    proc = subprocess.run(_cmd(workdir, run, mode), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _kill_when(workdir: Path, run: str, mode: str, ready) -> None:
    """Start a run and SIGKILL it (and its DataLoader workers) the moment `ready()` holds."""
    log = (workdir / f"{run}.log").open("w")
    proc = subprocess.Popen(_cmd(workdir, run, mode), env=ENV, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.0002)
    finally:
        if proc.poll() is None and not ready():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, (workdir / f"{run}.log").read_text()[-3000:])


def _max_step(run: Path) -> int:
    """The last step a run logged a loss for (0 before any)."""
    try:
        lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}") and "train/loss" in x]
    return max(steps, default=0)


def _last_values(run: Path) -> dict[str, dict[int, object]]:
    """For each metric, step -> the value logged last for that step."""
    out: dict[str, dict[int, object]] = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, {})[record["step"]] = value
    return out


def _assert_same_run(reference: Path, resumed: Path) -> None:
    ref, got = _last_values(reference), _last_values(resumed)
    steps = list(range(1, MAX_STEPS + 1))
    assert sorted(ref["data/batch_sha1"]) == sorted(got["data/batch_sha1"]) == steps
    assert len(set(ref["data/batch_sha1"].values())) == MAX_STEPS  # every step saw new data
    for step in steps:
        assert got["data/batch_sha1"][step] == ref["data/batch_sha1"][step], f"batches differ at step {step}"
        assert got["train/loss"][step] == pytest.approx(ref["train/loss"][step], rel=1e-5), step
    for step in ref["eval/loss"]:
        assert got["eval/loss"][step] == pytest.approx(ref["eval/loss"][step], rel=1e-5), step


@pytest.mark.parametrize("mode", list(MODES))
def test_sigkill_at_any_moment_resumes_to_the_uninterrupted_run(workdir, mode):
    runs = workdir / "runs"
    _train(workdir, f"ref-{mode}", mode)
    reference = runs / f"ref-{mode}"

    # 1. Killed after a checkpoint is complete, in the steps that follow it (step-10 written, step 12 logged).
    after = runs / f"after-{mode}"
    _kill_when(workdir, after.name, mode, lambda: (after / "step-10" / "trainer_state.json").is_file()
               and _max_step(after) >= 12)
    ckpt = latest_checkpoint(after)
    step = int(ckpt.name.split("-")[1])
    assert 10 <= step < MAX_STEPS and _max_step(after) > step  # some steps past it are redone after the resume
    stderr = _train(workdir, after.name, mode)
    assert f"resumed from {ckpt}" in stderr
    _assert_same_run(reference, after)

    # 2. Killed in the middle of writing a checkpoint: the .tmp is ignored, then cleaned and written again.
    mid = runs / f"mid-{mode}"
    tmp = mid / "step-15.tmp"
    _kill_when(workdir, mid.name, mode, tmp.is_dir)
    assert tmp.is_dir() and not (mid / "step-15").exists(), "the kill did not land while step-15 was written"
    assert latest_checkpoint(mid) == mid / "step-10"
    stderr = _train(workdir, mid.name, mode)
    assert f"resumed from {mid / 'step-10'}" in stderr
    assert not list(mid.glob("*.tmp")) and (mid / "step-15" / "trainer_state.json").is_file()
    _assert_same_run(reference, mid)
