"""Responses of a fine-tuned model: sampled eagerly even when training compiled the blocks."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from codeparrot.model import GPT, GPTConfig
from codeparrot.sft.format import PREAMBLE, format_prompt
from codeparrot.sft.responses import respond
from codeparrot.tokenizer import train_on

EOS = "<|endoftext|>"
RECORD = {"instruction": "Return the sum.", "input": "def add(a, b):", "output": "return a + b"}


def test_responses_are_sampled_eagerly_through_compiled_blocks():
    """Blocks compiled in place as prepare_model compiles them (backend eager here): respond() gives what the
    uncompiled model gives and compiles no frame, where a KV-cache step would otherwise be traced (a graph per
    prompt length, with breaks, 3.4 s against 0.02 s measured)."""
    tokenizer = train_on(iter([[format_prompt(RECORD), PREAMBLE, RECORD["output"]] * 4]), 300, 1, EOS)
    eos_id = tokenizer.token_to_id(EOS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_positions=256, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        eager = respond(model, tokenizer, RECORD, eos_id, 6)
        for block in model.h:
            block.compile(backend="eager")
        torch._dynamo.reset()
        counters.clear()
        compiled = respond(model, tokenizer, RECORD, eos_id, 6)
        assert compiled == eager and compiled[1] in ("eos", "length")
        assert not counters["frames"], dict(counters["frames"])  # nothing traced while sampling
        model(torch.tensor([[1, 2, 3]]))  # the control: a training-style forward does go through the compiled blocks
    assert counters["frames"]["ok"] > 0, dict(counters["frames"])
