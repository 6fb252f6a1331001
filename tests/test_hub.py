"""Publishing to the Hub: the real huggingface_hub client against the loopback test server (tests/loopback_hub.py).

Training runs are real `codeparrot train` processes on a tiny model; the server holds real bare git repos.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codeparrot.corpus.source import list_shards

from conftest import SUBPROCESS_ENV, build_training_corpus, read_all
from loopback_hub import HubServer

TOKEN = "hf_codeparrot_test_secret_7d1c"
REPO = "parrot/tiny-code"
TINY = ["tokenizer.vocab_size=400", "tokenizer.n_examples=200", "data.seq_length=32", "data.num_of_sequences=8",
        "model.preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "train.micro_batch_size=4",
        "train.warmup_steps=2", "train.learning_rate=0.003", "train.log_interval=1", "train.eval_interval=2",
        "train.save_interval=2", "train.keep_last=0", "train.mixed_precision=no", "eval.batch_size=4",
        "eval.max_batches=2", "eval.max_new_tokens=8", "corpus.valid_fraction=0.3"]
# The Hub calls of these processes: offline mode unset (it blocks loopback too), no Xet, the token in HF_TOKEN.
HUB_ENV = {**{k: v for k, v in SUBPROCESS_ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                    "TRANSFORMERS_OFFLINE")},
           "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubServer:
    """The server; this process's own client calls are let online (HF_HUB_OFFLINE blocks loopback too)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(tmp_path / "hub", token=TOKEN).start() as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A prepared corpus and tokenizer from real stdlib packages (email, json)."""
    return build_training_corpus(tmp_path_factory.mktemp("hub"), TINY, pretokenize=False)


def codeparrot(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "codeparrot", *map(str, args)], env=env or HUB_ENV,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train(workdir: Path, hub: HubServer, *overrides: str) -> subprocess.CompletedProcess:
    return codeparrot("train", f"paths.workdir={workdir}", *TINY, f"hub.repo_id={REPO}",
                      f"hub.endpoint={hub.endpoint}", *overrides)


def summary(stdout: str, title: str = "train") -> dict[str, str]:
    block = stdout.split(f"== {title} ==", 1)[1].split("\n== ", 1)[0]
    return dict(line.strip().split(": ", 1) for line in block.splitlines() if ": " in line)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_training_pushes_a_commit_per_checkpoint_to_its_branch_and_the_token_nowhere(workdir, hub):
    proc = train(workdir, hub, "train.run_name=pushed", "train.max_steps=6")
    result = summary(proc.stdout)
    pushed = json.loads(result["hub_pushed"])  # step 4 may be replaced by 6 while 2 is still being pushed
    assert pushed[0] == 2 and pushed[-1] == 6 and set(pushed) <= {2, 4, 6} and result["hub_failed"] == "[]"
    assert hub.commits(REPO, "pushed") == [f"step {n}" for n in reversed(pushed)] + ["initial commit"]
    assert len(hub.commits(REPO, "main")) == 1  # as created: training never touches main
    files = hub.files(REPO, "pushed")
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "README.md"} <= set(files)
    assert not any(name.startswith("accelerate/") or name.startswith("data_state") for name in files)
    assert "library_name: transformers" in files["README.md"].decode() and "| step | 6 |" in files["README.md"].decode()
    assert f"Bearer {TOKEN}" in hub.seen_authorization  # the token was used...
    run = workdir / "runs" / "pushed"
    for path in run.rglob("*"):  # ...and written nowhere: logs, metrics, TensorBoard, config.yaml, checkpoints
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in proc.stderr and TOKEN not in proc.stdout

    # The branch's last commit, downloaded, is the local checkpoint: transformers gives the same logits.
    from huggingface_hub import snapshot_download
    from transformers import GPT2LMHeadModel

    local = Path(snapshot_download(REPO, revision="pushed", endpoint=hub.endpoint, token=TOKEN,
                                   local_dir=str(workdir / "downloaded")))
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = GPT2LMHeadModel.from_pretrained(local).eval()(ids).logits
        want = GPT2LMHeadModel.from_pretrained(run / "step-6").eval()(ids).logits
    torch.testing.assert_close(got, want)

    # `hub list` shows the run's checkpoints; `hub promote` copies step 4 onto main and tags it.
    listed = codeparrot("hub", "list", f"hub.repo_id={REPO}", f"hub.endpoint={hub.endpoint}").stdout
    assert f"{REPO}@pushed: {len(pushed)} checkpoints" in listed and "step        2" in listed
    codeparrot("hub", "promote", "--branch", "pushed", "--step", "2", f"hub.repo_id={REPO}",
               f"hub.endpoint={hub.endpoint}")
    step2 = next(c for c in hub.commit_ids(REPO, "pushed") if c[1] == "step 2")[0]
    assert hub.files(REPO, "main") == hub.files(REPO, step2)
    assert hub.files(REPO, "pushed-step-2") == hub.files(REPO, step2)  # the tag

    # A checkpoint from the Hub serves generate (and evaluate, humaneval) like a local directory.
    out = workdir / "gen.jsonl"
    codeparrot("generate", "--checkpoint", f"hub:{REPO}@pushed-step-2", "-p", "def f(x):", "--max-new-tokens", "4",
               "-o", out, f"paths.workdir={workdir}", f"hub.endpoint={hub.endpoint}")
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == "def f(x):"


@pytest.mark.slow
def test_a_slow_server_never_slows_training_and_pruning_spares_what_is_pushed(workdir, hub):
    """2 s per commit, a checkpoint every step: steps go on while a push is in flight, newer ones replace waiting
    ones, the final one is pushed, and keep_last=1 never deletes a checkpoint waiting or being pushed."""
    hub.commit_delay = 2.0
    proc = train(workdir, hub, "train.run_name=slow", "train.max_steps=8", "train.save_interval=1",
                 "train.eval_interval=100", "train.keep_last=1")
    result = summary(proc.stdout)
    pushed = json.loads(result["hub_pushed"])
    assert pushed[0] == 1 and pushed[-1] == 8 and len(pushed) < 8  # some were replaced while waiting
    assert float(result["seconds"]) < 2.0 * len(pushed)  # the loop did not wait for the pushes
    assert float(result["hub_final_wait_s"]) > 0.5  # the end waited for the last push
    assert "keeping" in proc.stderr and "until its push is done" in proc.stderr
    for commit, title in hub.commit_ids(REPO, "slow")[:len(pushed)]:  # every pushed commit is a whole checkpoint
        assert {"model.safetensors", "trainer_state.json"} <= set(hub.files(REPO, commit)), title
    assert sorted(p.name for p in (workdir / "runs" / "slow").glob("step-*")) == ["step-8"]


@pytest.mark.slow
def test_a_server_that_goes_away_fails_pushes_but_not_training(workdir, hub):
    hub.commit_delay = 1.0
    cmd = [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={workdir}", *TINY, f"hub.repo_id={REPO}",
           f"hub.endpoint={hub.endpoint}", "train.run_name=gone", "train.max_steps=12", "train.save_interval=2",
           "hub.final_wait=30"]
    proc = subprocess.Popen(cmd, env=HUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any("/commit/" in path for _, path in hub.requests):
        time.sleep(0.02)  # the first push is under way (the server holds it for 1 s)
    hub.stop()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    result = summary(stdout)
    assert json.loads(result["hub_failed"]) and result["step"] == "12", stderr[-3000:]
    assert "push of step" in stderr and "failed" in stderr and TOKEN not in stderr


@pytest.mark.slow
def test_resume_from_the_hub_reproduces_the_uninterrupted_run(workdir, hub):
    """Push with the training state, lose the local run, resume from `hub:` under another name: same losses."""
    train(workdir, hub, "train.run_name=whole", "train.max_steps=6")
    train(workdir, hub, "train.run_name=first", "train.max_steps=6", "train.save_interval=4",
          "hub.include_training_state=true")
    step4 = next(sha for sha, title in hub.commit_ids(REPO, "first") if title == "step 4")
    assert "accelerate/optimizer.bin" in hub.files(REPO, step4)
    # the local run is gone; its step-4 commit on the Hub is all there is
    proc = train(workdir, hub, "train.run_name=second", "train.max_steps=6", f"train.resume=hub:{REPO}@{step4}")
    assert "resumed from" in proc.stderr
    whole, second = losses(workdir / "runs" / "whole"), losses(workdir / "runs" / "second")
    assert sorted(second) == [5, 6]
    for step in (5, 6):
        assert second[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6)
    # Weights only: a new run starts from them, and says so.
    proc = train(workdir, hub, "train.run_name=third", "train.max_steps=2", f"train.resume=hub:{REPO}@whole")
    assert "holds the weights only" in proc.stderr and "starting from the weights" in proc.stderr


def test_prepare_reads_the_raw_export_from_the_hub(tmp_path, hub, raw_export, make_config):
    """hf://datasets/... shards from the test server give the same clean/ as the local copies."""
    from huggingface_hub import HfApi

    raw, _ = raw_export
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("parrot/raw", repo_type="dataset", exist_ok=True)
    api.upload_folder(repo_id="parrot/raw", repo_type="dataset", folder_path=str(raw), path_in_repo="data",
                      allow_patterns=["*.json.gz", "*.jsonl.gz"])
    base = make_config(tmp_path / "local")
    overrides = [f"corpus.{k}={v}" for k, v in (("valid_fraction", base.corpus.valid_fraction),
                                                ("split_seed", base.corpus.split_seed))]
    codeparrot("prepare", f"paths.workdir={tmp_path / 'local'}", f"paths.raw={raw}", "corpus.source=path",
               *overrides)
    env = {**HUB_ENV, "HF_ENDPOINT": hub.endpoint}
    codeparrot("prepare", f"paths.workdir={tmp_path / 'remote'}", "paths.raw=hf://datasets/parrot/raw/data/*.gz",
               "corpus.source=path", *overrides, env=env)
    for split in ("train", "valid"):
        local = read_all(list_shards(tmp_path / "local" / "clean" / split))
        remote = read_all(list_shards(tmp_path / "remote" / "clean" / split))
        assert remote == local and local


def test_hub_push_publishes_the_clean_corpus_as_a_dataset(tmp_path, hub, workdir):
    codeparrot("hub", "push", workdir / "clean", "--repo", "parrot/clean", f"hub.endpoint={hub.endpoint}")
    files = hub.files("parrot/clean", "main", repo_type="dataset")
    assert any(name.startswith("train/") and name.endswith(".json.gz") for name in files)
    assert any(name.startswith("valid/") for name in files) and "manifest.json" in files
    assert "path: train/*.json.gz" in files["README.md"].decode()


def test_an_unreachable_hub_stops_training_before_it_starts(workdir, tmp_path):
    proc = codeparrot("train", f"paths.workdir={workdir}", *TINY, f"hub.repo_id={REPO}",
                      "hub.endpoint=http://127.0.0.1:9", "train.run_name=nohub", "train.max_steps=2", check=False)
    assert proc.returncode == 2 and "hub: cannot create" in proc.stderr and "Traceback" not in proc.stderr
    assert TOKEN not in proc.stderr
    assert not (workdir / "runs" / "nohub" / "step-2").exists()


def step_commit(api, branch: str, step: int, weights: bytes) -> str:
    """A `step N` commit on `branch` as a push makes it (a stand-in checkpoint); its id."""
    from huggingface_hub import CommitOperationAdd

    files = {"model.safetensors": weights, "trainer_state.json": json.dumps({"step": step}).encode()}
    info = api.create_commit(REPO, [CommitOperationAdd(p, data) for p, data in files.items()],
                             commit_message=f"step {step}", commit_description=f"step: {step}", revision=branch)
    return info.oid


@pytest.fixture
def run_branch(hub, monkeypatch):
    """REPO with a branch `run` holding steps 2 and 4, and the config whose hub.* reaches it."""
    from huggingface_hub import HfApi

    from codeparrot.config import load_config

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO)
    api.create_branch(REPO, branch="run")
    step_commit(api, "run", 2, b"weights of step 2")
    step_commit(api, "run", 4, b"weights of step 4")
    return api, load_config(None, [f"hub.repo_id={REPO}", f"hub.endpoint={hub.endpoint}"])


def test_promoting_the_same_step_again_succeeds_without_a_new_commit(hub, run_branch):
    from codeparrot.hub import promote

    _, cfg = run_branch
    first = promote(cfg, "run", 2)
    main = hub.commit_ids(REPO, "main")
    again = promote(cfg, "run", 2)
    assert again["commit"] == first["commit"] and again["tag"] == first["tag"] == "run-step-2"
    assert hub.commit_ids(REPO, "main") == main  # main already held step 2: nothing committed
    # after another step was promoted, step 2 comes back onto main; its tag stays where it was
    promote(cfg, "run", 4)
    promote(cfg, "run", 2)
    assert hub.files(REPO, "main")["model.safetensors"] == b"weights of step 2"
    assert hub.commit_ids(REPO, "run-step-2")[0][0] == first["commit"]


def test_promote_refuses_a_tag_of_another_checkpoint_before_touching_main(hub, run_branch):
    from codeparrot.hub import HubError, promote

    api, cfg = run_branch
    promote(cfg, "run", 2)
    step_commit(api, "run", 2, b"a restarted run's step 2")  # the branch pushed again under the same name
    main = hub.commit_ids(REPO, "main")
    with pytest.raises(HubError, match=r"tag run-step-2 .* another checkpoint.*hf repos tag delete parrot/tiny-code "
                                       r"run-step-2"):
        promote(cfg, "run", 2)
    assert hub.commit_ids(REPO, "main") == main


@pytest.fixture(scope="module")
def pushed_with_state(workdir) -> Path:
    """A tiny run's step-2 checkpoint, everything in it: weights, tokenizer, optimizer, RNG and data state."""
    from conftest import run_cli

    run_cli("train", f"paths.workdir={workdir}", *TINY, "train.run_name=local", "train.max_steps=2")
    return workdir / "runs" / "local" / "step-2"


def test_consumers_fetch_the_weights_without_the_training_state(tmp_path, hub, run_branch, pushed_with_state):
    """generate, humaneval, evaluate and sft get weights, config and tokenizer; a training resume gets it all."""
    from codeparrot.generate import load_checkpoint
    from codeparrot.hub import resolve_checkpoint

    api, cfg = run_branch
    api.upload_folder(repo_id=REPO, folder_path=str(pushed_with_state), revision="run", commit_message="step 2")
    assert "accelerate/optimizer.bin" in hub.files(REPO, "run")
    hub.requests.clear()
    local = Path(resolve_checkpoint(f"hub:{REPO}@run", cfg.hub, tmp_path / "hub"))
    got = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert not any(name.startswith(("accelerate/", "data_state")) for name in got), got
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "config.yaml"} <= got
    load_checkpoint(local)  # the model and tokenizer load
    assert not any("optimizer" in path for _, path in hub.requests)


# Two processes resolve a hub: checkpoint as `humaneval` and `evaluate` under `accelerate launch` do.
FETCH_WORKER = """
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from codeparrot.config import load_config
from codeparrot.hub import HubError, resolve_checkpoint

endpoint, repo, into = sys.argv[1:4]
h = load_config(None, [f"hub.endpoint={endpoint}"]).hub
local = Path(resolve_checkpoint(f"hub:{repo}@run", h, Path(into)))
rank = int(os.environ["RANK"])
report = [str(local), str((local / "model.safetensors").is_file())]
try:
    resolve_checkpoint(f"hub:{repo}@no-such-branch", h, Path(into))
except HubError as e:  # on every rank: none waits for a download that failed
    report.append(str(e))
Path(into, f"rank{rank}.json").write_text(json.dumps(report))
if dist.is_initialized():  # as the CLI ends: a process group left open can abort the exit
    dist.destroy_process_group()
"""


def test_only_the_main_process_asks_the_hub_for_a_checkpoint(tmp_path, hub, run_branch):
    """Under a 2-process launch rank 0 downloads and rank 1 takes the same directory without a Hub request; a
    failed download stops both ranks with the error instead of leaving rank 1 waiting."""
    from conftest import free_port

    from codeparrot.hub import resolve_checkpoint

    _, cfg = run_branch
    hub.requests.clear()
    resolve_checkpoint(f"hub:{REPO}@run", cfg.hub, tmp_path / "one")
    one_process = len(hub.requests)
    hub.requests.clear()
    script = tmp_path / "fetch_worker.py"
    script.write_text(FETCH_WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(script), hub.endpoint, REPO, str(tmp_path / "two")]
    proc = subprocess.run(cmd, env={**HUB_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([r for r in hub.requests if "no-such-branch" not in r[1]]) == one_process, hub.requests
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0][:2] == ranks[1][:2] == [str(tmp_path / "two" / f"{REPO.replace('/', '--')}@run"), "True"]
    assert all(len(r) == 3 and "cannot fetch hub:parrot/tiny-code@no-such-branch" in r[2] for r in ranks), ranks
