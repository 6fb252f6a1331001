"""The `sft` stage on real docstring records: full, LoRA and packed runs, exports, responses, plots and resume."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from codeparrot.config import load_config
from codeparrot.model import GPT, GPTConfig, load_hf
from codeparrot.plots import loss_figure, read_metrics
from codeparrot.runs import write_model_dir
from codeparrot.sft.data import SFT_DATA
from codeparrot.sft.finetune import run_sft
from codeparrot.sft.responses import ResponseWriter, score_test_split
from codeparrot.tokenizer import load_tokenizer

from conftest import SUBPROCESS_ENV

N_POSITIONS = 96
RECIPE = ["sft.allowed_max_length=96", "sft.max_record_tokens=300", "sft.batch_size=4", "sft.eval_interval=2",
          "sft.eval_batches=2", "sft.max_new_tokens=12", "sft.learning_rate=0.002", "sft.max_records=24",
          "train.mixed_precision=no", "train.trackers=", "train.keep_last=0"]


@pytest.fixture(scope="module")
def sft_config(trained_tokenizer, tmp_path_factory):
    """The fixture corpus and tokenizer, their docstring records in sft/, and a random tiny base model."""
    cfg, _ = trained_tokenizer
    root = tmp_path_factory.mktemp("sft")
    base = root / "base"
    tokenizer = load_tokenizer(cfg.paths.resolve("tokenizer"))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_positions=N_POSITIONS, n_layer=2, n_head=2,
                        n_embd=32))
    base.mkdir()
    write_model_dir(base, gpt, gpt.state_dict(), cfg.paths.resolve("tokenizer"), tokenizer.token_to_id("<|endoftext|>"),
                    cfg)
    overrides = [f"paths.workdir={cfg.paths.workdir}", f"paths.clean={cfg.paths.resolve('clean')}",
                 f"paths.tokenizer={cfg.paths.resolve('tokenizer')}", f"paths.sft={root / 'records'}",
                 f"paths.runs={root / 'runs'}", f"sft.base={base}", *RECIPE]
    make = lambda *more: load_config(None, [*overrides, *more])  # noqa: E731
    SFT_DATA.run(make())
    return make


def test_full_fine_tuning_learns_and_writes_what_transformers_loads(sft_config):
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    cfg = sft_config("sft.run_name=full")
    result = run_sft(cfg)
    assert result["val_loss_after"] < result["val_loss_before"] - 0.1, result
    out = cfg.paths.resolve("runs") / "full"
    test = (cfg.paths.resolve("sft") / "test.jsonl").read_text().splitlines()
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses["records"]) == len(test) == result["test_records"] > 0
    assert set(responses["metrics"]) >= {"exact_match", "syntax_valid", "stopped_at_eos"}
    assert all({"instruction", "input", "output", "model_response", "finish"} <= set(r) for r in responses["records"])

    final = out / "final"
    hf, tok = GPT2LMHeadModel.from_pretrained(final).eval(), PreTrainedTokenizerFast.from_pretrained(final)
    ids = torch.tensor([tok("def add(a, b):\n    return a + b")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_hf(final).eval()(ids).logits, rtol=1e-4, atol=1e-4)

    assert (out / "loss.png").is_file() and (cfg.paths.resolve("sft") / "lengths.png").is_file()
    ax = loss_figure(read_metrics(out), "t").axes[0]
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "loss"
    # another recipe under the same name is refused, naming the key that picks another run: sft's, not train's
    with pytest.raises(ValueError, match=r"use another sft\.run_name or train\.resume=none"):
        run_sft(sft_config("sft.run_name=full", "sft.learning_rate=0.001"))
    assert [line.get_label() for line in ax.get_lines()] == ["train", "validation"]
    train, valid = (list(line.get_xdata()) for line in ax.get_lines())
    assert train == valid and train[0] == 0  # the evaluator's train loss (what the log prints), from step 0
    assert any(a.get_xlabel().startswith("tokens seen") for a in ax.child_axes)
    samples = [json.loads(line) for line in (out / "logs" / "samples.jsonl").read_text().splitlines()]
    assert [s["when"] for s in samples] == ["before fine-tuning", "end of epoch 1", "end of epoch 2"]
    assert run_sft(cfg)["skipped"] is True  # a second run finds it done


def test_lora_trains_only_adapters_and_exports_a_merged_gpt2(sft_config, caplog):
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    cfg = sft_config("sft.run_name=lora", "sft.method=lora", "sft.lora_rank=4", "sft.lora_alpha=8",
                     "sft.learning_rate=0.01")
    caplog.set_level(logging.INFO)
    result = run_sft(cfg)
    assert "checkpoint: saved" in caplog.text and "Removed shared tensor" not in caplog.text  # the tied head
    # the fixture's one test prompt fills the 96-token context: the summary says so instead of an empty string
    assert (result["example_response"], result["example_finish"]) == (
        "(none: the prompt fills the model's context)", "no_room")
    out = cfg.paths.resolve("runs") / "lora"
    n_layer, n_embd, r = 2, 32, 4
    # attn.c_attn (32 -> 96) and attn.c_proj (32 -> 32) per layer: A [r, in] + B [out, r]
    assert result["trainable_params"] == n_layer * (r * n_embd + 3 * n_embd * r + r * n_embd + n_embd * r)
    assert result["val_loss_after"] < result["val_loss_before"], result
    adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert sorted(adapter) == sorted(f"h.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("c_attn", "c_proj")
                                     for ab in "ab")
    base = load_hf(cfg.sft.base).state_dict()
    final = load_hf(out / "final").state_dict()
    assert torch.equal(final["h.0.mlp.c_fc.weight"], base["h.0.mlp.c_fc.weight"])  # not adapted: untouched
    assert not torch.equal(final["h.0.attn.c_attn.weight"], base["h.0.attn.c_attn.weight"])  # merged update
    for ckpt in (out / "final", out / f"step-{result['steps']}"):  # checkpoints are merged GPT-2s too
        GPT2LMHeadModel.from_pretrained(ckpt)


class OneProcess:
    """What the response writers ask of an Accelerator, for one process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()


def generating(monkeypatch, text: str) -> tuple[Any, Any]:
    """(model, tokenizer) stand-ins whose every greedy response is `text`, ended by max_new_tokens."""
    from codeparrot.sampler import Completion

    monkeypatch.setattr("codeparrot.sft.responses.sample",
                        lambda model, prompts, cfg, decode: [[Completion([0] * cfg.max_new_tokens, text, "length")]])
    model = SimpleNamespace(config=SimpleNamespace(n_positions=64))
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: SimpleNamespace(ids=text.split()),
                                decode=lambda ids, skip_special_tokens: text)
    return model, tokenizer


def test_a_blank_response_is_said_to_be_blank_and_blank_lines_are_folded(monkeypatch, tmp_path, caplog):
    # an undertrained LoRA run's greedy output on the tiny config: newlines only, which extraction strips to ""
    model, tokenizer = generating(monkeypatch, "\n" * 20)
    record = {"instruction": "Add.", "input": "def add(a, b):", "output": "return a + b"}
    no_room = {**record, "input": "x " * 80}
    result = score_test_split(OneProcess(), model, tokenizer, [no_room, record], 0, 8, tmp_path, "fp")
    assert result["example_input"] == "def add(a, b):"  # the first record with room for a response
    assert result["example_response"] == "(blank: the model generated only whitespace, 20 newlines, until length)"
    rows = json.loads((tmp_path / "responses.json").read_text())["records"]
    assert [r["model_response"] for r in rows] == ["", ""]  # scored as it came

    generating(monkeypatch, "def add(a, b):\n" + "\n" * 20 + "    return a + b\n\n")
    writer = ResponseWriter(OneProcess(), model, tokenizer, record, 0, 8, tmp_path / "samples.jsonl")
    caplog.set_level(logging.INFO)
    assert writer.sample(2, "end of epoch 1") == "def add(a, b):\n" + "\n" * 20 + "    return a + b"
    assert caplog.records[-1].getMessage().endswith("\ndef add(a, b):\n[20 blank lines]\n    return a + b")


def test_packed_run_learns(sft_config):
    result = run_sft(sft_config("sft.run_name=packed", "sft.packing=true", "sft.batch_size=2"))
    assert result["train_rows"] < 24 and result["val_loss_after"] < result["val_loss_before"], result


def test_a_transformers_gpt2_with_its_own_tokenizer_is_a_base(sft_config, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    cfg = sft_config()
    tokenizer_file = cfg.paths.resolve("tokenizer") / "tokenizer.json"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=N_POSITIONS, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    result = run_sft(sft_config("sft.run_name=from-hf", f"sft.base={tmp_path / 'gpt2'}", "sft.max_steps=2"))
    assert result["steps"] == 2 and (cfg.paths.resolve("runs") / "from-hf" / "final" / "model.safetensors").is_file()


def test_bad_settings_stop_with_a_clear_error(sft_config, tmp_path):
    with pytest.raises(ValueError, match="tied to the token embedding"):
        run_sft(sft_config("sft.run_name=bad", "sft.method=lora", "sft.lora_targets=lm_head"))
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        run_sft(sft_config("sft.run_name=bad", f"sft.base={tmp_path}"))
    with pytest.raises(ValueError, match="make no optimizer step"):
        run_sft(sft_config("sft.run_name=bad", "sft.batch_size=1000"))


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]  # a resumed run logs some steps again: the last one counts
    return out


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(sft_config):
    cfg = sft_config()
    args = [f"{k}={v}" for k, v in (("paths.workdir", cfg.paths.workdir), ("paths.clean", cfg.paths.clean),
                                    ("paths.tokenizer", cfg.paths.tokenizer), ("paths.sft", cfg.paths.sft),
                                    ("paths.runs", cfg.paths.runs), ("sft.base", cfg.sft.base))]
    args += [*RECIPE, "sft.eval_interval=1", "sft.save_interval=3", "sft.epochs=3", "sft.lora_dropout=0.2",
             "sft.method=lora"]  # dropout on: the RNG state must come back too
    cmd = [sys.executable, "-m", "codeparrot", "sft", *args]
    ref = subprocess.run(cmd + ["sft.run_name=ref"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(cmd + ["sft.run_name=killed"], env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    seen, deadline = b"", time.monotonic() + 300
    while not re.search(rb"step 4/\d+: loss", seen) and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 5)[0]:
            chunk = os.read(proc.stderr.fileno(), 1 << 16)
            if not chunk:
                break
            seen += chunk
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, seen[-2000:]
    runs = cfg.paths.resolve("runs")
    assert (runs / "killed" / "step-3").is_dir() and not (runs / "killed" / "final").exists()
    again = subprocess.run(cmd + ["sft.run_name=killed"], env=SUBPROCESS_ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]
    want, got = _losses(runs / "ref"), _losses(runs / "killed")
    assert sorted(got) == sorted(want) and len(want) >= 6
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def _eval_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


@pytest.mark.slow
def test_two_gloo_processes_fine_tune_as_one_at_twice_the_batch(sft_config):
    """Rank r takes global batches r, r+2, ...: 2 processes at batch 2 see the rows 1 process sees at batch 4, and
    the token-weighted loss across ranks makes the same steps."""
    from conftest import free_port, summaries

    cfg = sft_config()
    args = [f"{k}={v}" for k, v in (("paths.workdir", cfg.paths.workdir), ("paths.clean", cfg.paths.clean),
                                    ("paths.tokenizer", cfg.paths.tokenizer), ("paths.sft", cfg.paths.sft),
                                    ("paths.runs", cfg.paths.runs), ("sft.base", cfg.sft.base))]
    args += [*RECIPE, "sft.eval_batches=0", "sft.max_new_tokens=2"]
    one = subprocess.run([sys.executable, "-m", "codeparrot", "sft", *args, "sft.batch_size=4", "sft.run_name=one"],
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), "-m", "codeparrot", "sft", *args,
                          "sft.batch_size=2", "sft.run_name=two"],
                         env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert summaries(two.stdout)["sft"]["processes"] == "2" and summaries(one.stdout)["sft"]["processes"] == "1"
    runs = cfg.paths.resolve("runs")
    for got, want in ((_losses(runs / "two"), _losses(runs / "one")),
                      (_eval_losses(runs / "two"), _eval_losses(runs / "one"))):
        assert sorted(got) == sorted(want) and want
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4), step
