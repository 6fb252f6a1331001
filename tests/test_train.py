"""Training loop: schedule, perplexity, checkpoints, exact resume, and two real CPU processes."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codeparrot.config import load_config
from codeparrot.evaluate import run_evaluate
from codeparrot.runs import latest_checkpoint, read_trainer_state
from codeparrot.train import build_lr_schedule, lr_lambda

from conftest import SUBPROCESS_ENV, build_training_corpus, free_port, train_cli, train_losses

TINY = [
    "tokenizer.vocab_size=400", "tokenizer.n_examples=200",
    "data.seq_length=32", "data.num_of_sequences=8",
    "model.preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
    "train.micro_batch_size=4", "train.warmup_steps=2", "train.learning_rate=0.003",
    "train.log_interval=1", "train.eval_interval=3", "train.save_interval=3", "train.keep_last=0",
    "train.mixed_precision=no", "eval.batch_size=4", "eval.max_batches=2", "eval.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A prepared corpus and tokenizer made from real stdlib packages (email, json)."""
    return build_training_corpus(tmp_path_factory.mktemp("train"), ["corpus.valid_fraction=0.3", *TINY],
                                 pretokenize=False)


def _train(workdir: Path, *overrides: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`codeparrot train` on the tiny config (two CPU processes when `launcher` is an accelerate launch)."""
    return train_cli(workdir, ["corpus.valid_fraction=0.3", *TINY, *overrides], launcher)


_losses = train_losses


def test_schedule_warms_up_then_follows_cosine():
    fn = lr_lambda(warmup_steps=10, max_steps=110, schedule="cosine", min_ratio=0.1)
    assert fn(0) == pytest.approx(0.1)
    assert fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0)
    assert fn(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert fn(110) == pytest.approx(0.1)
    assert fn(500) == pytest.approx(0.1)  # past max_steps it stays at the floor
    assert lr_lambda(5, 100, "constant", 0.0)(50) == 1.0
    with pytest.raises(ValueError, match="cosine or constant"):
        lr_lambda(5, 100, "linear", 0.0)


@pytest.mark.slow
def test_train_checkpoints_and_resume_match_uninterrupted(workdir):
    """An interrupted run resumed from its checkpoint logs the same losses as an uninterrupted one."""
    _train(workdir, "train.run_name=full", "train.max_steps=6")
    full = workdir / "runs" / "full"
    ckpt = full / "step-6"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "config.yaml",
                 "data_state_rank0.pt", "accelerate/optimizer.bin"):
        assert (ckpt / name).exists(), name
    state = read_trainer_state(ckpt)
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["model_max_length"] == 32  # n_positions
    assert state.step == 6 and state.tokens_seen == 6 * 4 * 32
    assert [h["step"] for h in state.history] == [0, 3, 6]  # eval at step 0, every 3 steps, and the end
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    events = list((full / "logs").rglob("events.out.tfevents*"))
    assert events, "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent)).Reload()
    ppl = {e.step: e.value for e in acc.Scalars("eval/perplexity")}
    assert sorted(ppl) == [0, 3, 6] and ppl[6] < ppl[0]
    assert (full / "loss.png").read_bytes()[:4] == b"\x89PNG"  # drawn at the end of training
    assert ppl[6] == pytest.approx(math.exp(state.history[-1]["loss"]), rel=1e-4)

    # Simulate a crash after step 3: keep only the step-3 checkpoint and the log lines up to it.
    _train(workdir, "train.run_name=cut", "train.max_steps=6")
    cut = workdir / "runs" / "cut"
    shutil.rmtree(cut / "step-6")
    (cut / "step-6.tmp").mkdir()  # a half-written save must not be taken for the latest
    metrics = (cut / "logs" / "metrics.jsonl").read_text().splitlines()
    (cut / "logs" / "metrics.jsonl").write_text(
        "".join(m + "\n" for m in metrics if json.loads(m)["step"] <= 3))
    proc = _train(workdir, "train.run_name=cut", "train.max_steps=6")
    assert "resumed from" in proc.stderr
    full_losses, cut_losses = _losses(full), _losses(cut)
    assert sorted(cut_losses) == sorted(full_losses) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert cut_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6)

    # A finished run is skipped; a config change that alters the run refuses to resume.
    again = _train(workdir, "train.run_name=full", "train.max_steps=6")
    assert "skipping" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "codeparrot", "train", f"paths.workdir={workdir}",
                          "corpus.valid_fraction=0.3", *TINY, "train.run_name=full", "train.max_steps=9",
                          "train.learning_rate=0.1"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "cannot resume" in bad.stderr

    # Evaluate writes its result beside the run.
    cfg = load_config(None, [f"paths.workdir={workdir}", "corpus.valid_fraction=0.3", *TINY])
    result = run_evaluate(cfg, ckpt)
    assert math.isfinite(result["perplexity"]) and result["tokens"] > 0
    assert result["loss"] == pytest.approx(state.history[-1]["loss"], rel=1e-4)
    assert isinstance(result["completion"], str)
    assert json.loads((full / "eval" / "step-6.json").read_text())["tokens"] == result["tokens"]

    # The CLI reads the checkpoint's own config (its workdir, data and eval settings), overrides on top.
    (full / "eval" / "step-6.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "codeparrot", "evaluate", "--checkpoint", str(ckpt),
                           "eval.max_batches=1"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    one_batch = json.loads((full / "eval" / "step-6.json").read_text())
    assert one_batch["tokens"] == 4 * 31  # eval.batch_size=4 of the run's config, seq 32: one batch


def _launch_two_cpu_processes(workdir: Path, *overrides: str, accelerate_config: str | None = None) -> None:
    """`accelerate launch` two real CPU processes (gloo) running `codeparrot train`."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        launcher += ["--config_file", accelerate_config]
    else:
        launcher += ["--multi_gpu"]
    launcher += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port()), "-m"]
    _train(workdir, *overrides, launcher=launcher)  # a launcher: _train adds ACCELERATE_USE_CPU=1 to a copy


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync_on_different_data(workdir):
    _launch_two_cpu_processes(workdir, "train.run_name=ddp", "train.max_steps=3")
    logs = workdir / "runs" / "ddp" / "logs"
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert ranks[0]["first_batch_sha1"] != ranks[1]["first_batch_sha1"]
    ckpt = workdir / "runs" / "ddp" / "step-3"
    states = [torch.load(ckpt / f"data_state_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert states[0] != states[1]
    assert read_trainer_state(ckpt).tokens_seen == 3 * 4 * 32 * 2


@pytest.mark.slow
def test_fsdp_config_trains_saves_and_resumes_on_two_cpu_processes(workdir):
    """The shipped FSDP config launched on two CPU processes (accelerate runs it as data parallel there; FSDP2
    itself: the fsdp2 test below): it trains, saves an HF checkpoint that evaluates alike, and resumes."""
    fsdp = str(Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml")
    _launch_two_cpu_processes(workdir, "train.run_name=fsdp", "train.max_steps=3", accelerate_config=fsdp)
    run = workdir / "runs" / "fsdp"
    assert [json.loads((run / "logs" / f"rank{r}.json").read_text())["world_size"] for r in (0, 1)] == [2, 2]
    _launch_two_cpu_processes(workdir, "train.run_name=fsdp", "train.max_steps=6", accelerate_config=fsdp)
    state = read_trainer_state(run / "step-6")
    assert state.step == 6 and [h["step"] for h in state.history] == [0, 3, 6]
    # The HF-format weights gathered from the shards are the trained ones: evaluated alone, they beat step 0
    # (unsharded-but-wrong weights, e.g. one rank's shard or a fresh init, would not).
    cfg = load_config(None, [f"paths.workdir={workdir}", "corpus.valid_fraction=0.3", *TINY])
    result = run_evaluate(cfg, run / "step-6")
    assert math.isfinite(result["loss"]) and result["loss"] < state.history[0]["loss"]


@pytest.mark.slow
def test_damaged_checkpoint_and_bad_intervals_give_clear_errors(workdir):
    _train(workdir, "train.run_name=damaged", "train.max_steps=3")
    run = workdir / "runs" / "damaged"
    optimizer = run / "step-3" / "accelerate" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a save cut off by a full disk, say
    cmd = [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={workdir}", "corpus.valid_fraction=0.3",
           *TINY, "train.run_name=damaged", "train.max_steps=6"]
    proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "step-3 is damaged" in proc.stderr and "Traceback" not in proc.stderr

    (run / "step-3" / "tokenizer.json").unlink()
    cfg = load_config(None, [f"paths.workdir={workdir}", "corpus.valid_fraction=0.3", *TINY])
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        run_evaluate(cfg, run / "step-3")

    proc = subprocess.run(cmd[:-1] + ["train.save_interval=0"], env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "train.save_interval must be at least 1" in proc.stderr


def test_pipeline_never_overwrites_a_foreign_export(tmp_path, workdir):
    from codeparrot.pipeline import pipeline_steps

    foreign = tmp_path / "bigquery"
    shutil.copytree(workdir / "raw", foreign)
    (foreign / "manifest.json").unlink()  # as a BigQuery download has none
    cfg = load_config(None, [f"paths.workdir={tmp_path}", f"paths.raw={foreign}"])
    assert cfg.corpus.source == "local"
    assert pipeline_steps(cfg)[0].name == "prepare"
    fresh = load_config(None, [f"paths.workdir={tmp_path}"])
    assert pipeline_steps(fresh)[0].name == "export-local"


def test_lr_follows_the_current_schedule_from_the_step_alone():
    cfg = load_config(None, ["train.learning_rate=2.0", "train.warmup_steps=2", "train.max_steps=10"])
    lr_at = build_lr_schedule(cfg.train)
    assert [lr_at(s) for s in (0, 1)] == [1.0, 2.0]
    assert lr_at(10) == pytest.approx(0.0)
    longer = build_lr_schedule(load_config(None, ["train.learning_rate=2.0", "train.warmup_steps=2",
                                                  "train.max_steps=20"]).train)
    assert longer(10) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 8 / 18)))


@pytest.mark.slow
def test_a_save_that_fails_never_becomes_the_latest_checkpoint(workdir):
    """A checkpoint write that fails (file size limit: EFBIG, as a full disk gives ENOSPC) leaves no step dir."""
    script = ("import resource, signal, sys; from codeparrot.cli import main; "
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", script, "train", f"paths.workdir={workdir}", "corpus.valid_fraction=0.3", *TINY,
           "train.run_name=fulldisk", "train.max_steps=3", "model.n_embd=64"]
    proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "saving" in proc.stderr and "step-3 failed" in proc.stderr and "File too large" in proc.stderr
    run = workdir / "runs" / "fulldisk"
    assert latest_checkpoint(run) is None
    assert not [p for p in run.iterdir() if p.name.startswith("step-")]


@pytest.mark.slow
def test_fsdp2_builds_on_meta_shards_trains_every_weight_and_saves_a_transformers_checkpoint(tmp_path):
    """FSDP2 itself on two CPU processes (accelerate would run fsdp.yaml as plain DDP on a CPU; the worker forces
    FSDP2): the meta model is materialised shard by shard, the optimizer holds each parameter once (accelerate's
    by-address mapping gives meta parameters one shared address), every weight trains, and the gathered
    checkpoint loads in transformers."""
    from transformers import GPT2LMHeadModel

    from codeparrot.model import load_hf

    worker = Path(__file__).parent / "fsdp_worker.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(worker), str(tmp_path), "300"]
    proc = subprocess.run(cmd, env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["built_on_meta"] and report["sharded"]
        assert not report["any_meta_left"]
        assert report["distinct_optimizer_params"] == report["optimizer_params"] == report["named_params"]
        assert report["optimizer_holds_the_model_params"] and report["unchanged_after_training"] == []
    assert reports[0]["grad_norms"] == pytest.approx(reports[1]["grad_norms"], rel=1e-6)  # one global norm
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-4)


def _finite_checkpoints(run: Path) -> dict[int, str]:
    """step -> sha1 of model.safetensors of every complete checkpoint, each checked to hold finite weights."""
    from safetensors.torch import load_file

    found = {}
    for ckpt in sorted(run.glob("step-*")):
        weights = load_file(ckpt / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt
        assert all(math.isfinite(h["loss"]) for h in read_trainer_state(ckpt).history), ckpt
        found[int(ckpt.name.split("-")[1])] = hashlib.sha1((ckpt / "model.safetensors").read_bytes()).hexdigest()
    return found


def _run_worker(workdir: Path, kind: str, rank: int, first: int, *overrides: str, two: bool = False):
    """tests/nan_worker.py: `codeparrot train` with the loss poisoned on one rank from step `first` on."""
    launcher = [sys.executable]
    env = SUBPROCESS_ENV
    if two:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
        env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}
    cmd = launcher + [str(Path(__file__).with_name("nan_worker.py")), kind, str(rank), str(first),
                      f"paths.workdir={workdir}", "corpus.valid_fraction=0.3", *TINY, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step(workdir):
    """lr 1000 (the issue's run): exit 2 with one message; no checkpoint at or after that step; those before it
    hold finite weights and losses."""
    cmd = [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={workdir}", "corpus.valid_fraction=0.3",
           *TINY, "train.run_name=diverge", "train.max_steps=30", "train.learning_rate=1000", "train.save_interval=1",
           "train.eval_interval=100"]
    proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "training diverged at step" in message and "nothing saved after it" in message, message
    assert "train.learning_rate" in message and "Traceback" not in proc.stderr
    step = int(message.split("at step ")[1].split(":")[0])
    saved = _finite_checkpoints(workdir / "runs" / "diverge")
    assert step > 1 and sorted(saved) == list(range(1, step)), (step, sorted(saved))
    assert f"last good checkpoint: {workdir / 'runs' / 'diverge' / f'step-{step - 1}'}" in message


@pytest.mark.slow
def test_nan_on_rank_1_only_stops_both_ranks_before_the_step(workdir):
    """Two gloo processes; rank 1's loss is nan from step 5: both stop there, step-3 is untouched, no step-6."""
    proc = _run_worker(workdir, "nan", 1, 5, "train.run_name=nan2", "train.max_steps=9", two=True)
    assert proc.returncode != 0
    assert "training diverged at step 5" in proc.stderr and "on rank 1 (losses by rank:" in proc.stderr, \
        proc.stderr[-3000:]
    assert "last good checkpoint:" in proc.stderr and "nan2/step-3" in proc.stderr
    by_rank = proc.stderr.split("losses by rank: ")[1].split(")")[0].split(", ")
    assert len(by_rank) == 2 and math.isfinite(float(by_rank[0])) and by_rank[1] == "nan"  # a world of 2
    assert sorted(_finite_checkpoints(workdir / "runs" / "nan2")) == [3]


@pytest.mark.slow
def test_skip_spikes_skips_an_injected_spike_and_trains_on(workdir):
    """A x50 loss at step 25 after 24 calm steps: skipped (weights kept), counted, logged; the run finishes."""
    common = ["train.max_steps=27", "train.save_interval=100", "train.eval_interval=100", "train.warmup_steps=1",
              "train.learning_rate=0.0003"]
    proc = _run_worker(workdir, "spike", 0, 25, "train.run_name=spiky", "train.skip_spikes=true",
                       "train.spike_sigma=6", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: step 25 skipped (loss" in proc.stderr and "1 skipped so far" in proc.stderr
    state = read_trainer_state(workdir / "runs" / "spiky" / "step-27")
    assert state.spikes["skipped"] == 1 and len(state.spikes["losses"]) == 26
    plain = _run_worker(workdir, "spike", 0, 25, "train.run_name=unguarded", *common)
    assert plain.returncode == 0 and "skipped" not in plain.stderr  # off by default: the spike trains
