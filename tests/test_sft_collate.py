"""The instruction-tuning collate against the chapter's rules, on hand-written ids and on a real tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from codeparrot.sft.collate import IGNORE, collate
from codeparrot.sft.format import encode_record, format_prompt
from codeparrot.tokenizer import train_on

EOS = 0
X = IGNORE


def test_padding_shift_and_masking_follow_the_chapter():
    """Pad with EOS to the longest row + 1; each row's first EOS is a target, the padding after it is not."""
    batch = collate([([5, 6, 7], 1), ([8, 9], 1)], EOS, allowed_max_length=1024)
    assert batch.inputs.tolist() == [[5, 6, 7], [8, 9, EOS]]
    assert batch.targets.tolist() == [[6, 7, EOS], [9, EOS, X]]
    assert batch.target_tokens == 5 and batch.dropped == 0


def test_an_eos_inside_the_text_is_still_learned():
    """Masking by position: an EOS id in the middle of a row is a target like any token (by value it would go)."""
    batch = collate([([5, EOS, 6], 1), ([7], 1)], EOS, allowed_max_length=1024)
    assert batch.targets.tolist() == [[EOS, 6, EOS], [EOS, X, X]]


def test_mask_prompt_masks_exactly_the_prompt_predictions():
    batch = collate([([1, 2, 3, 4, 5], 3), ([6, 7, 8], 2)], EOS, allowed_max_length=1024, mask_prompt=True)
    # row 0: prompt 1 2 3, response 4 5 -> targets predicting 2 and 3 are masked; 4, 5, EOS learned
    assert batch.targets.tolist() == [[X, X, 4, 5, EOS], [X, 8, EOS, X, X]]


def test_truncation_cuts_rows_and_drops_rows_left_without_targets():
    batch = collate([([1, 2, 3, 4, 5], 1), ([6, 7], 1)], EOS, allowed_max_length=3)
    assert batch.inputs.tolist() == [[1, 2, 3], [6, 7, EOS]] and batch.targets.tolist() == [[2, 3, 4], [7, EOS, X]]
    # with the prompt masked, a long prompt truncated to 3 tokens keeps no target: dropped and counted
    batch = collate([([1, 2, 3, 4, 5, 6], 5), ([7, 8], 1)], EOS, allowed_max_length=3, mask_prompt=True)
    # the kept rows are padded among themselves: no column of padding only
    assert batch.dropped == 1 and batch.inputs.tolist() == [[7, 8]] and batch.targets.tolist() == [[8, EOS]]
    with pytest.raises(ValueError, match="every row of this batch lost all its targets"):
        collate([([1, 2, 3, 4, 5, 6], 5)], EOS, allowed_max_length=3, mask_prompt=True)


def test_literal_endoftext_in_user_text_never_becomes_the_eos_id():
    stdlib = Path(os.__file__).parent
    texts = [(stdlib / name).read_text() for name in ("abc.py", "bisect.py", "colorsys.py")]
    tok = train_on(iter([texts]), vocab_size=400, min_frequency=2, eos_token="<|endoftext|>")
    eos = tok.token_to_id("<|endoftext|>")
    record = {"instruction": "Split on <|endoftext|>.", "input": "", "output": "text.split('<|endoftext|>')"}
    ids, n_prompt = encode_record(record, tok)
    assert eos not in ids
    assert tok.decode(ids[:n_prompt]) == format_prompt(record) and tok.decode(ids[n_prompt:]) == record["output"]
    batch = collate([(ids, n_prompt)], eos, allowed_max_length=4096)
    assert (batch.targets == eos).sum() == 1 and batch.targets[0, len(ids) - 1] == eos  # the one appended EOS
    assert torch.equal(batch.inputs[0, :len(ids)], torch.tensor(ids))


def test_real_tokens_leave_padding_out():
    # tokens/s and MFU count these: a padded or packed batch's padding is not work the user asked for
    from codeparrot.model import count_real_tokens
    from codeparrot.sft.collate import collate_packed, make_example, pad_examples

    examples = [make_example(list(range(10, 10 + n)), 2, 0, 64, mask_prompt=True) for n in (5, 3, 7)]
    padded = pad_examples(examples, eos_id=0)
    assert padded.inputs.numel() == 21 and int(count_real_tokens(padded.model_inputs())) == 15
    packed = collate_packed([[examples[0], examples[1]], [examples[2]]], eos_id=0)
    assert packed.inputs.numel() == 16 and int(count_real_tokens(packed.model_inputs())) == 15
    block = torch.zeros(2, 8, dtype=torch.long)
    assert count_real_tokens({"input_ids": block, "labels": block}) == 16
