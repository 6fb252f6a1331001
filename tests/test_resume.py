"""A training process killed with SIGKILL resumes to exactly the batches and losses of an uninterrupted run.

Each run logs `data/batch_sha1` (a digest of every step's token ids, `train.record_batch_digests=true`) and
`train/loss` every step. A killed run's metrics.jsonl has lines past its last checkpoint; the resumed run logs
those steps again, so for each step the LAST logged value is the one compared.

Nothing here polls. A run is killed either when its stderr (read as it comes, `select` with a deadline) shows a
log line, or at an exact point of a checkpoint save: the run is started through a bootstrap that installs an
audit hook (`sys.addaudithook`), and the first file operation under a chosen path (`os.mkdir`, `open`, ...)
announces itself on stderr and then blocks the process until the SIGKILL arrives.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codeparrot.train import latest_checkpoint

from conftest import SUBPROCESS_ENV, build_training_corpus

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
TRANSFORMS = ["data.fim_rate=0.5", "data.quality_tokens=true"]  # every draw keyed by (seed, epoch, document)
MODES = {"streaming": ["data.pretokenized=false"], "pretokenized": ["data.pretokenized=true"],
         "streaming-fim": ["data.pretokenized=false", *TRANSFORMS],
         "pretokenized-fim": ["data.pretokenized=true", *TRANSFORMS]}


KILL_POINT = "@@codeparrot-test-kill-point@@"
# `python -c BOOTSTRAP train ...` is `python -m codeparrot train ...` with an audit hook: the first file operation
# whose path lies under $CODEPARROT_TEST_BLOCK_UNDER (and whose name starts with $CODEPARROT_TEST_BLOCK_NAME, if
# set) writes KILL_POINT to stderr, then blocks until the test's SIGKILL. The hook fires before the operation.
BOOTSTRAP = f"""
import os, runpy, signal, sys
under = os.path.join(os.path.abspath(os.environ["CODEPARROT_TEST_BLOCK_UNDER"]), "")
name = os.environ.get("CODEPARROT_TEST_BLOCK_NAME", "")
events = {{"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink", "shutil.copyfile"}}
def hook(event, args):
    if event in events and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(under) and os.path.basename(path).startswith(name):
            os.write(2, ("\\n{KILL_POINT} " + event + " " + path + "\\n").encode())
            while True:
                signal.pause()
sys.addaudithook(hook)
runpy.run_module("codeparrot", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A prepared corpus (real stdlib packages email and json), its tokenizer and its token shards."""
    return build_training_corpus(tmp_path_factory.mktemp("resume"), TINY, pretokenize=True)


def _cmd(workdir: Path, run: str, mode: str) -> list[str]:
    return [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={workdir}", *TINY, *MODES[mode],
            f"train.run_name={run}"]


def _train(workdir: Path, run: str, mode: str) -> str:
    proc = subprocess.run(_cmd(workdir, run, mode), env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _kill_when(workdir: Path, run: str, mode: str, pattern: str, block_under: Path | None = None,
               block_name: str = "") -> str:
    """Start a run, read its stderr as it comes until a line matches `pattern`, then SIGKILL it (and its
    DataLoader workers). With `block_under`, the run blocks itself at its first file operation under that path
    (see BOOTSTRAP), so the kill lands exactly there. Returns the matching line."""
    env = dict(SUBPROCESS_ENV)
    cmd = _cmd(workdir, run, mode)
    if block_under is not None:
        env.update(CODEPARROT_TEST_BLOCK_UNDER=str(block_under), CODEPARROT_TEST_BLOCK_NAME=block_name)
        cmd = [sys.executable, "-c", BOOTSTRAP] + cmd[3:]  # cmd is [python, -m, codeparrot, train, ...]
    log_path = workdir / f"{run}.log"
    regex = re.compile(pattern)
    matched = None
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.PIPE, start_new_session=True)
        fd, pending, deadline = proc.stderr.fileno(), b"", time.monotonic() + 300
        try:
            while matched is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    break  # deadline passed: fall through to the kill and the assertion below
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break  # the run ended without printing the line
                log.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                matched = next((line.decode(errors="replace") for line in lines
                                if regex.search(line.decode(errors="replace"))), None)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
    tail = log_path.read_text(errors="replace")[-3000:]
    assert matched is not None, f"no stderr line matched {pattern!r} before the run ended or timed out:\n{tail}"
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, tail)
    return matched


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


def _reference(workdir: Path, mode: str) -> Path:
    """The uninterrupted run of a mode (trained once per module)."""
    run = workdir / "runs" / f"ref-{mode}"
    if _max_step(run) < MAX_STEPS:
        _train(workdir, run.name, mode)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_run(workdir, mode):
    """Every data path's state (stream position, packing buffer, FIM generator) comes back from the checkpoint."""
    runs, reference = workdir / "runs", _reference(workdir, mode)
    # Killed after a checkpoint is complete, in the steps that follow it (step-10 written, step 12 logged).
    after = runs / f"after-{mode}"
    _kill_when(workdir, after.name, mode, r"\bstep\s+12\b")
    assert (after / "step-10" / "trainer_state.json").is_file() and _max_step(after) >= 12
    ckpt = latest_checkpoint(after)
    step = int(ckpt.name.split("-")[1])
    assert 10 <= step < MAX_STEPS and _max_step(after) > step  # some steps past it are redone after the resume
    stderr = _train(workdir, after.name, mode)
    assert f"resumed from {ckpt}" in stderr
    _assert_same_run(reference, after)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_one_before(workdir):
    """Killed in the middle of writing a checkpoint: the .tmp is ignored, then cleaned and written again.
    (a) at the first file written into step-15.tmp; (b) as trainer_state.json, the file whose presence marks a
    checkpoint complete and which is written last, is opened: everything else of step-15 is on disk. Checkpoint
    writing is the same for every data path: checked on the one with the most state."""
    mode = "pretokenized-fim"
    runs, reference = workdir / "runs", _reference(workdir, mode)
    for moment, name in (("early", ""), ("late", "trainer_state.json")):
        mid = runs / f"mid-{moment}-{mode}"
        tmp = mid / "step-15.tmp"
        _kill_when(workdir, mid.name, mode, KILL_POINT, block_under=tmp, block_name=name)
        assert tmp.is_dir() and not (mid / "step-15").exists(), "the kill did not land while step-15 was written"
        if name:  # everything but the completion marker is there: only its absence tells the save is unfinished
            assert (tmp / "model.safetensors").is_file() and not (tmp / "trainer_state.json").exists()
        assert latest_checkpoint(mid) == mid / "step-10"
        stderr = _train(workdir, mid.name, mode)
        assert f"resumed from {mid / 'step-10'}" in stderr
        assert not list(mid.glob("*.tmp")) and (mid / "step-15" / "trainer_state.json").is_file()
        _assert_same_run(reference, mid)
