"""Evaluation: perplexity and generation inputs on the model's device."""
from __future__ import annotations

import math

import pytest
import torch

from codeparrot.evaluate import perplexity
from codeparrot.model import GPT, GPTConfig


def test_perplexity_overflows_to_inf():
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e6) == float("inf")


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
