"""One line per expected failure: every command turns a wrong path, a refused resume or a Hub failure into one
stderr line that says what to fix, with exit status 2 and no traceback. Each case runs the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SUBPROCESS_ENV
from test_hub import HUB_ENV, REPO, TOKEN, hub  # noqa: F401 (hub: the loopback Hub fixture)

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def codeparrot(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m codeparrot ...` (offline unless `env` says otherwise)."""
    return subprocess.run([sys.executable, "-m", "codeparrot", *map(str, args)], env=env or SUBPROCESS_ENV,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, command: str, *words: str) -> str:
    """The single stderr line of a failed command, checked to hold `words`, with no traceback or token."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    line = lines[0]
    assert line.startswith(f"codeparrot {command}: error: "), line
    for word in words:
        assert word in line, (word, line)
    assert TOKEN not in proc.stderr + proc.stdout
    return line


# -- the Hub ----------------------------------------------------------------------------------------------------

def test_hub_list_without_a_reachable_hub_says_which_keys_set_it():
    proc = codeparrot("hub", "list", f"hub.repo_id={REPO}", f"hub.endpoint={UNREACHABLE}", env=HUB_ENV)
    one_line_error(proc, "hub", f"cannot list the runs of {REPO}", f"cannot reach the Hub at {UNREACHABLE}",
                   "hub.endpoint", "HF_ENDPOINT")


def test_hub_commands_name_a_missing_repo_branch_or_bad_token(hub, tmp_path):  # noqa: F811
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo(REPO)
    at = f"hub.endpoint={hub.endpoint}"
    one_line_error(codeparrot("hub", "list", "hub.repo_id=parrot/no-such-repo", at, env=HUB_ENV), "hub",
                   "no repo parrot/no-such-repo", hub.endpoint, "hub.repo_id", "HF_TOKEN")
    one_line_error(codeparrot("hub", "promote", "--branch", "nope", f"hub.repo_id={REPO}", at, env=HUB_ENV), "hub",
                   f"cannot promote {REPO}@nope", "no branch, tag or commit nope", "codeparrot hub list")
    artifact = tmp_path / "tokenizer"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"stage": "train-tokenizer"}))
    wrong = {**HUB_ENV, "HF_TOKEN": "hf_not_the_right_one"}
    line = one_line_error(codeparrot("hub", "push", artifact, "--repo", REPO, at, env=wrong), "hub",
                          "HTTP 401", "HF_TOKEN", f"access to {REPO}")
    assert "hf_not_the_right_one" not in line
    one_line_error(codeparrot("generate", "--checkpoint", f"hub:{REPO}@nope", "-p", "x", at, env=HUB_ENV),
                   "generate", f"cannot fetch hub:{REPO}@nope", "no branch, tag or commit nope")


def test_offline_mode_is_one_line_too():
    one_line_error(codeparrot("hub", "list", f"hub.repo_id={REPO}"), "hub", "HF_HUB_OFFLINE=1", "unset it")


def tiny_checkpoint(directory: Path) -> Path:
    """A random 1-layer model and a small tokenizer saved as a checkpoint (no config.yaml)."""
    import torch

    from codeparrot.model import GPT, GPTConfig, save_hf
    from codeparrot.tokenizer import train_on

    texts = [Path(os.__file__).parent.joinpath(name).read_text() for name in ("abc.py", "bisect.py")]
    tok = train_on(iter([texts]), vocab_size=300, min_frequency=2, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    save_hf(GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_positions=32, n_layer=1, n_head=2, n_embd=16)),
            directory, eos_token_id=tok.token_to_id("<|endoftext|>"))
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_generate_fetches_a_hub_checkpoint_into_the_hubs_cache_and_says_where(hub, tmp_path):  # noqa: F811
    """Without --config or paths.*, nothing is written under the current directory: the download goes to the Hub's
    cache (HF_HUB_CACHE), and one INFO line names it."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=str(tiny_checkpoint(tmp_path / "step-1")), commit_message="step 1")
    cwd, cache = tmp_path / "cwd", tmp_path / "hf-cache"
    cwd.mkdir()
    proc = codeparrot("generate", "--checkpoint", f"hub:{REPO}", "-p", "def f(x):", "--max-new-tokens", "3",
                      f"hub.endpoint={hub.endpoint}", env={**HUB_ENV, "HF_HUB_CACHE": str(cache)}, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    fetched = [line for line in proc.stderr.splitlines() if f"hub: fetched hub:{REPO}" in line]
    assert len(fetched) == 1 and " INFO " in fetched[0], proc.stderr
    local = Path(fetched[0].split(" into ", 1)[1].split(" (", 1)[0])
    assert local.is_relative_to(cache) and (local / "model.safetensors").is_file(), fetched


# -- checkpoint paths -------------------------------------------------------------------------------------------

@pytest.fixture
def run(tmp_path) -> Path:
    """runs/tiny with a complete step-4 (the files' presence is all these checks read), a partial step-6.tmp and
    a step-5 whose weights are gone."""
    run = tmp_path / "runs" / "tiny"
    for step in ("step-2", "step-4", "step-5", "step-6.tmp"):
        (run / step).mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"):
            (run / step / name).write_text("{}")
    (run / "step-5" / "model.safetensors").unlink()
    (run / "step-6.tmp" / "trainer_state.json").unlink()
    return run


def test_a_missing_checkpoint_says_it_does_not_exist(tmp_path):
    one_line_error(codeparrot("generate", "--checkpoint", tmp_path / "nope" / "step-1", "-p", "x"), "generate",
                   f"--checkpoint {tmp_path / 'nope' / 'step-1'} does not exist")


@pytest.mark.slow
def test_a_run_directory_names_its_latest_checkpoint(run):
    line = f"--checkpoint {run} is a run directory, not a checkpoint; did you mean {run / 'step-4'} (its latest)?"
    assert one_line_error(codeparrot("generate", "--checkpoint", run, "-p", "x"), "generate").endswith(line)
    one_line_error(codeparrot("evaluate", "--checkpoint", run), "evaluate", line)
    one_line_error(codeparrot("humaneval", "--checkpoint", run), "humaneval", line)
    one_line_error(codeparrot("sft", f"sft.base={run}"), "sft", f"sft.base={run} is a run directory",
                   f"did you mean {run / 'step-4'}")
    one_line_error(codeparrot("generate", "--checkpoint", run.parent, "-p", "x"), "generate",
                   "is a directory of runs", str(run / "step-4"))


@pytest.mark.slow
def test_a_partial_checkpoint_says_what_is_missing_and_names_the_latest_complete_one(run):
    latest = f"the latest complete one in {run} is {run / 'step-4'}"
    one_line_error(codeparrot("generate", "--checkpoint", run / "step-6.tmp", "-p", "x"), "generate",
                   "is a partial save, interrupted (missing trainer_state.json)", latest)
    one_line_error(codeparrot("generate", "--checkpoint", run / "step-6", "-p", "x"), "generate",
                   "does not exist: only step-6.tmp, an interrupted save, is there", latest)
    one_line_error(codeparrot("evaluate", "--checkpoint", run / "step-5"), "evaluate",
                   "is not a complete checkpoint: missing model.safetensors", latest)
    one_line_error(codeparrot("humaneval", "--checkpoint", run / "step-9"), "humaneval", "does not exist", latest)
    one_line_error(codeparrot("sft", f"sft.base={run / 'step-5'}"), "sft", "missing model.safetensors", latest)


# -- refused resumes --------------------------------------------------------------------------------------------

def saved_run(work: Path, *overrides: str) -> Path:
    """A run `r` whose step-2 was trained with `overrides`, over stand-in clean/ and tokenizer/ artifacts."""
    from codeparrot.config import load_config
    from codeparrot.runs import TrainerState, training_fingerprint
    from codeparrot.train import _inputs

    for name in ("clean", "tokenizer"):
        (work / name).mkdir(parents=True, exist_ok=True)
        (work / name / "data").write_text(name)
    cfg = load_config(None, [f"paths.workdir={work}", "train.run_name=r", *overrides])
    step = work / "runs" / "r" / "step-2"
    step.mkdir(parents=True)
    cfg.save(step / "config.yaml")
    state = TrainerState(step=2, config_fingerprint=training_fingerprint(cfg, _inputs(cfg)))
    (step / "trainer_state.json").write_text(json.dumps(vars(state)))
    return step


@pytest.mark.slow
def test_a_refused_resume_names_the_keys_that_changed(tmp_path):
    work = tmp_path / "work"
    saved_run(work, "model.n_layer=2", "train.learning_rate=0.01")
    proc = codeparrot("train", f"paths.workdir={work}", "train.run_name=r", "model.n_layer=1",
                      "train.learning_rate=0.02")
    one_line_error(proc, "train", f"cannot resume from {work / 'runs' / 'r' / 'step-2'}",
                   "(model.n_layer: 2 -> 1, train.learning_rate: 0.01 -> 0.02)",
                   "use another train.run_name or train.resume=none")
    (work / "clean" / "more").write_text("a rebuilt corpus")
    proc = codeparrot("train", f"paths.workdir={work}", "train.run_name=r", "model.n_layer=2",
                      "train.learning_rate=0.01")
    assert "(inputs.clean: " in one_line_error(proc, "train", "cannot resume")


def test_sft_and_older_checkpoints_name_the_changes_too(tmp_path):
    """sft's fingerprint holds the sft section (its advice names sft.run_name); a fingerprint that is no JSON is
    compared through the checkpoint's config.yaml."""
    from codeparrot.config import canonical_json, load_config
    from codeparrot.runs import find_resume

    step = saved_run(tmp_path, "model.n_layer=2")
    saved = canonical_json({"sft": {"lora_rank": 8}, "inputs": {"base": "aa"}})
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, "config_fingerprint": saved}))
    cfg = load_config(None, [f"paths.workdir={tmp_path}"])
    now = canonical_json({"sft": {"lora_rank": 16}, "inputs": {"base": "aa"}})
    with pytest.raises(ValueError, match=r"\(sft.lora_rank: 8 -> 16\); use another sft.run_name"):
        find_resume(cfg, step.parent, now, run_key="sft.run_name")
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, "config_fingerprint": "0123abcd"}))
    with pytest.raises(ValueError, match=r"\(model.n_layer: 2 -> null\)"):
        find_resume(cfg, step.parent, "4567ef01")


# -- summaries --------------------------------------------------------------------------------------------------

def test_summaries_print_lists_as_json(capsys):
    from codeparrot.cli import _summary

    _summary("t", {"names": ["a", "b"], "steps": (2, 4), "counts": {"x": 1}})
    assert capsys.readouterr().out.splitlines()[1:] == ['  names: ["a", "b"]', "  steps: [2, 4]",
                                                        '  counts: {"x": 1}']
