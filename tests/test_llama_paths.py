"""Every downstream path on `model.arch=llama`: the model card, starting from weights, LoRA (an untied head too),
and end to end: train, evaluate, generate (= transformers' greedy), humaneval, exact resume, sft LoRA, Muon + WSD,
and two gloo processes."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from codeparrot.config import load_config
from codeparrot.hub import model_card
from codeparrot.model import GPT, GPTConfig, load_hf, resolve_model_config, save_hf
from codeparrot.sft.lora import LoRALinear, apply_lora, merge_lora
from codeparrot.train import build_model

from conftest import (SUBPROCESS_ENV, build_training_corpus, free_port, run_cli, train_cli, train_losses,
                      write_jsonl)

SHAPE = ["model.preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32"]
# test_train.py's TINY, at 96 positions (room for a HumanEval prompt and a few sampled tokens) and on llama
TINY = [
    "tokenizer.vocab_size=400", "tokenizer.n_examples=200", "corpus.valid_fraction=0.3",
    "data.seq_length=96", "data.num_of_sequences=8", *SHAPE, "model.arch=llama",
    "train.micro_batch_size=4", "train.warmup_steps=2", "train.learning_rate=0.003",
    "train.log_interval=1", "train.eval_interval=2", "train.save_interval=2", "train.keep_last=0",
    "train.mixed_precision=no", "eval.batch_size=4", "eval.max_batches=2", "eval.max_new_tokens=8",
]
EOS = "<|endoftext|>"


def tiny(arch: str, **kw) -> GPTConfig:
    return GPTConfig(vocab_size=300, n_positions=32, n_layer=2, n_head=2, n_embd=32, arch=arch, **kw)


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


# ---- fast: the model card, build_model's checks, LoRA ----------------------------------------------------------

@pytest.mark.parametrize("arch, kw, tag", [("gpt2", {}, "gpt2"), ("llama", {}, "llama"),
                                           ("llama", {"qk_norm": True}, "qwen3")])
def test_model_card_tags_the_checkpoints_arch(tmp_path, arch, kw, tag):
    save_hf(random_model(tiny(arch, **kw)), tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1, "tokens_seen": 10, "history": []}))
    card = model_card(load_config(None, []), tmp_path)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["tags"] == ["code", "python", tag, "codeparrot"]


def _config(*overrides: str):
    return load_config(None, ["data.seq_length=32", *SHAPE, *overrides])


def _checkpoint(directory: Path, *overrides: str) -> Path:
    """A random model of the config `overrides` give, saved as a checkpoint directory."""
    save_hf(random_model(resolve_model_config(_config(*overrides).model, 300, 32)), directory)
    return directory


@pytest.mark.parametrize("source, target", [("gpt2", "llama"), ("llama", "gpt2")])
def test_starting_from_another_archs_weights_names_model_arch(tmp_path, source, target):
    ckpt = _checkpoint(tmp_path, f"model.arch={source}")
    with pytest.raises(ValueError) as e:
        build_model(_config(f"model.arch={target}"), 300, SimpleNamespace(is_fsdp2=False), ckpt)
    message = str(e.value)
    assert f"model.arch is {target}" in message and f"model.arch={source}" in message and "\n" not in message


def test_starting_from_llama_weights_loads_them_and_other_llama_shapes_are_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "a", "model.arch=llama")
    model = build_model(_config("model.arch=llama"), 300, SimpleNamespace(is_fsdp2=False), ckpt)
    source = load_hf(ckpt).state_dict()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    for override, key in [("model.n_kv_head=1", "model.n_kv_head"), ("model.tie_embeddings=true",
                                                                      "model.tie_embeddings"),
                          ("model.intermediate_size=64", "model.intermediate_size")]:
        with pytest.raises(ValueError, match=key) as e:
            build_model(_config("model.arch=llama", override), 300, SimpleNamespace(is_fsdp2=False), ckpt)
        assert "\n" not in str(e.value)


def _linear_suffixes(model: GPT) -> set[str]:
    return {n.split(".", 2)[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
            n.startswith("h.")}


def test_llama_has_the_lora_target_names_of_gpt2():
    assert _linear_suffixes(random_model(tiny("llama"))) == _linear_suffixes(random_model(tiny("gpt2"))) == \
        {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


@pytest.mark.parametrize("model", [tiny("gpt2"), tiny("llama", tie_embeddings=True)], ids=["gpt2", "tied-llama"])
def test_lora_on_a_tied_head_is_refused(model):
    with pytest.raises(ValueError, match="tied to the token embedding"):
        apply_lora(random_model(model), ["attn.c_attn", "lm_head"], 4, 8.0, 0.0)


def test_lora_on_llamas_untied_head_trains_merges_and_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model = random_model(tiny("llama"))
    wte = model.wte.weight.detach().clone()
    targets = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"]
    names = apply_lora(model, targets, 4, 8.0, 0.0)
    assert sorted(names) == sorted(["lm_head", *(f"h.{i}.{t}" for i in range(2) for t in targets[:4])])
    assert isinstance(model.lm_head, LoRALinear) and not model.wte.weight.requires_grad
    with torch.no_grad():  # a non-zero update everywhere, as training would leave
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0.0, 0.05)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    model.config.loss_chunk_size = 8  # the chunked loss multiplies by lm_head.weight itself: the adapted one
    chunked = model(ids, labels=ids)
    model.config.loss_chunk_size = 0
    torch.testing.assert_close(chunked.loss, out.loss)
    chunked.loss.backward()
    assert model.lm_head.lora_a.grad is not None and model.lm_head.lora_a.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    merged = merge_lora(model)
    assert torch.equal(merged.wte.weight, wte)  # the embedding is untouched by the head's adapter
    with torch.no_grad():
        logits = merged(ids).logits
        torch.testing.assert_close(logits, out.logits)
    save_hf(merged, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits, rtol=1e-4, atol=1e-4)


# ---- end to end on the CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A prepared corpus and tokenizer made from real stdlib packages (email, json)."""
    return build_training_corpus(tmp_path_factory.mktemp("llama"), TINY, pretokenize=False)


def _train(workdir: Path, *overrides: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return train_cli(workdir, [*TINY, *overrides], launcher)


_losses = train_losses


@pytest.fixture(scope="module")
def trained(workdir) -> Path:
    """`codeparrot train model.arch=llama` 4 steps: its step-4 checkpoint."""
    _train(workdir, "train.run_name=full", "train.max_steps=4")
    ckpt = workdir / "runs" / "full" / "step-4"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    return ckpt


@pytest.mark.slow
def test_llama_trains_evaluates_and_resumes_exactly(workdir, trained):
    full = trained.parent
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["history"][-1]["loss"] < state["history"][0]["loss"]
    run_cli("evaluate", "--checkpoint", str(trained))
    result = json.loads((full / "eval" / "step-4.json").read_text())
    assert math.isfinite(result["perplexity"]) and result["tokens"] > 0
    assert result["loss"] == pytest.approx(state["history"][-1]["loss"], rel=1e-4)

    _train(workdir, "train.run_name=cut", "train.max_steps=2")
    proc = _train(workdir, "train.run_name=cut", "train.max_steps=4")
    assert "resumed from" in proc.stderr
    full_losses, cut_losses = _losses(full), _losses(workdir / "runs" / "cut")
    assert sorted(cut_losses) == sorted(full_losses) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert cut_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6), (cut_losses, full_losses)


@pytest.mark.slow
def test_llama_greedy_generate_equals_transformers(capsys, tmp_path, trained):
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from codeparrot.cli import main
    from codeparrot.generate import encode_prompt

    tok = Tokenizer.from_file(str(trained / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    hf = LlamaForCausalLM.from_pretrained(trained).eval()
    for i, prompt in enumerate(["def add(a, b):\n    return", "import os\n"]):
        out = tmp_path / f"{i}.jsonl"
        assert main(["generate", "--checkpoint", str(trained), "-p", prompt, "--temperature", "0",
                     "--max-new-tokens", "16", "-o", str(out)]) == 0
        capsys.readouterr()
        [row] = [json.loads(line) for line in out.read_text().splitlines()]
        ids = torch.tensor([encode_prompt(tok, prompt, eos)])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                 eos_token_id=eos, pad_token_id=eos)[0, ids.size(1):].tolist()
        if row["finish"] == "eos":
            assert theirs[-1] == eos
            theirs = theirs[:-1]
        assert row["tokens"] == len(theirs) and row["completion"] == tok.decode(theirs), (row, theirs)


@pytest.mark.slow
def test_llama_humaneval_one_problem_two_samples(tmp_path, trained):
    problems = write_jsonl(tmp_path / "problems.jsonl", [
        {"task_id": "Small/0", "prompt": 'def add(a, b):\n    """Sum of a and b."""\n', "entry_point": "add",
         "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n"}])
    cmd = [sys.executable, "-m", "codeparrot", "humaneval", "--checkpoint", str(trained),
           f"humaneval.problems={problems}", "humaneval.limit=1", "humaneval.n=2", "humaneval.batch_size=2",
           "humaneval.max_new_tokens=16", "humaneval.temperature=0.8", "humaneval.ks=1,2"]
    p = subprocess.run(cmd, env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = trained.parent / "humaneval" / trained.name
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["Small/0"] * 2
    report = json.loads((out / "pass_at_k.json").read_text())
    assert 0.0 <= report["pass@1"] <= 1.0 and "pass@2" in report


@pytest.mark.slow
def test_llama_sft_lora_with_the_untied_head_exports_a_llama(workdir, trained):
    from transformers import LlamaForCausalLM

    from codeparrot.sft.data import SFT_DATA
    from codeparrot.sft.finetune import run_sft

    overrides = [f"paths.workdir={workdir}", f"paths.sft={workdir / 'sft-records'}", f"paths.runs={workdir / 'sft'}",
                 f"sft.base={trained}", "sft.allowed_max_length=96", "sft.max_record_tokens=0", "sft.batch_size=2",
                 "sft.eval_interval=2", "sft.eval_batches=1", "sft.max_new_tokens=4", "sft.learning_rate=0.01",
                 "sft.max_records=16", "sft.max_steps=2", "train.mixed_precision=no", "train.trackers=",
                 "train.keep_last=0", "sft.method=lora", "sft.lora_rank=4", "sft.lora_alpha=8",
                 "sft.lora_targets=attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj,lm_head"]
    cfg = load_config(None, overrides)
    SFT_DATA.run(cfg)
    result = run_sft(cfg)
    assert result["steps"] == 2
    final = workdir / "sft" / "sft" / "final"
    base, merged = load_hf(trained).state_dict(), load_hf(final).state_dict()
    assert torch.equal(merged["wte.weight"], base["wte.weight"])
    for name in ("lm_head.weight", "h.0.mlp.c_fc.weight", "h.1.attn.c_attn.weight"):
        assert not torch.equal(merged[name], base[name]), name  # every target's update merged
    hf = LlamaForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_hf(final).eval()(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_llama_trains_with_muon_and_wsd(workdir):
    _train(workdir, "train.run_name=muon", "train.max_steps=3", "train.optimizer=muon", "train.lr_schedule=wsd")
    losses = _losses(workdir / "runs" / "muon")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert (workdir / "runs" / "muon" / "step-3" / "model.safetensors").is_file()


@pytest.mark.slow
def test_llama_two_gloo_processes_train_in_sync(workdir):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m"]
    _train(workdir, "train.run_name=ddp", "train.max_steps=2", launcher=launcher)
    logs = workdir / "runs" / "ddp" / "logs"
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert ranks[0]["first_batch_sha1"] != ranks[1]["first_batch_sha1"]
