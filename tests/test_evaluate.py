"""Evaluation: perplexity and generation inputs on the model's device."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from codeparrot.evaluate import perplexity
from codeparrot.model import GPT, GPTConfig


def test_perplexity_overflows_to_inf():
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e6) == float("inf")


def test_evaluation_builds_no_autograd_graph():
    """Without no_grad every batch's graph stays alive through the running sum: the whole valid split
    (eval.max_batches=0) then filled 24 GB here."""
    from accelerate import Accelerator

    from codeparrot.evaluate import evaluate_loss

    model = GPT(GPTConfig(vocab_size=64, n_positions=16, n_layer=1, n_head=2, n_embd=16))
    grad_on = []
    model.register_forward_pre_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    result = evaluate_loss(model, batches, Accelerator(cpu=True), max_batches=0, unscored=[5])
    assert grad_on == [False] * 3 and result["tokens"] == sum(int((b[:, 1:] != 5).sum()) for b in batches)


def test_prompts_are_made_on_the_models_device(trained_tokenizer):
    """A model on `meta` sees only `meta` inputs: a prompt built on the CPU (a crash on every GPU) would show here."""
    from codeparrot.evaluate import complete
    from codeparrot.tokenizer import load_tokenizer

    cfg, _ = trained_tokenizer
    tokenizer = load_tokenizer(cfg.paths.resolve("tokenizer"))
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_layer=1, n_head=2, n_embd=16))
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.extend(a.device.type for a in args))
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):  # decoding meta ids fails, afterwards
        complete(model, tokenizer, "def f(x):", 4, eos_id=0)
    assert seen and set(seen) == {"meta"}


def test_one_buckets_loss_under_its_own_and_another_token(trained_tokenizer, tmp_path):
    """eval.quality_bucket reads only that bucket's validation files from clean/valid (token shards or not), and
    eval.quality_token changes the token in front of each; the results name both and do not overwrite each other."""
    import dataclasses

    from codeparrot.corpus.source import BadRecords, iter_shard, list_shards
    from codeparrot.evaluate import run_evaluate
    from codeparrot.model import save_hf
    from codeparrot.tokenizer import load_tokenizer

    base, _ = trained_tokenizer
    tokenizer = load_tokenizer(base.paths.resolve("tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_layer=1, n_head=2, n_embd=16))
    ckpt = tmp_path / "run" / "step-1"
    save_hf(model, ckpt, eos_token_id=0)
    (ckpt / "tokenizer.json").write_text(base.paths.resolve("tokenizer").joinpath("tokenizer.json").read_text())

    def evaluate(**keys) -> dict:
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, seq_length=32, quality_tokens=True,
                                                                 pretokenized=True),
                                  eval=dataclasses.replace(base.eval, prompt="", max_batches=0, batch_size=2, **keys))
        return run_evaluate(cfg, ckpt)

    valid = list_shards(base.paths.resolve("clean") / "valid")
    records = [r for shard in valid for _, r in iter_shard(shard, BadRecords())]
    high = [r["content"] for r in records if r["quality"] == "high"]
    assert high and len(high) < len(records)  # a real selection
    own, wrong = evaluate(quality_bucket="high"), evaluate(quality_bucket="high", quality_token="low")
    # the stream of the high files, each as <quality_high> + its tokens + EOS, cut into whole 32-token blocks; every
    # position but a block's last is scored, except where the target is the quality token
    q = tokenizer.token_to_id("<quality_high>")
    stream = [t for text in high for t in [q, *tokenizer.encode(text, add_special_tokens=False).ids, 0]]
    blocks = [stream[i:i + 32] for i in range(0, len(stream) - 31, 32)]
    assert own["tokens"] == wrong["tokens"] == sum(31 - b[1:].count(q) for b in blocks)
    assert own["loss"] != wrong["loss"]
    assert (own["quality_bucket"], wrong["quality_token"]) == ("high", "low")
    assert Path(own["written"]).name == "step-1.quality-high.json"
    assert Path(wrong["written"]).name == "step-1.quality-high.token-low.json"
