"""Packing without cross-talk, and fine-tuning's epoch batches: shuffled, sharded, resumable."""
from __future__ import annotations

import random

import pytest
import torch

from codeparrot.model import GPT, GPTConfig
from codeparrot.sft.collate import IGNORE, collate_packed, make_example, pack_rows, pad_examples
from codeparrot.sft.loader import EpochBatches, ordered_batches, row_collate

EOS = 0
VOCAB = 64


def examples(n: int, seed: int = 0, mask_prompt: bool = False) -> list:
    """n examples of 3..20 random tokens (ids from 1), prompts of 2..4 tokens."""
    rng = random.Random(seed)
    items = [([rng.randrange(1, VOCAB) for _ in range(rng.randrange(3, 21))], rng.randrange(2, 5)) for _ in range(n)]
    return [make_example(ids, p, EOS, 1024, mask_prompt) for ids, p in items]


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, n_positions=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_pack_rows_places_every_example_once_and_never_overflows():
    lengths = [random.Random(1).randrange(1, 40) for _ in range(200)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) < 200 / 2  # it does pack
    with pytest.raises(ValueError, match="more than a row"):
        pack_rows([10, 65], 64)


def test_a_packed_row_keeps_positions_documents_and_targets_apart():
    exs = examples(3)
    batch = collate_packed([exs], EOS)
    lengths = [len(x) for x, _ in exs]
    assert batch.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    assert batch.document_ids[0].tolist() == [d for d, n in enumerate(lengths) for _ in range(n)]
    assert batch.inputs[0].tolist() == [t for x, _ in exs for t in x]
    # each example's last target is its own EOS: no target predicts the next example's first token
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert batch.targets[0, ends].tolist() == [EOS] * 3


def test_packed_forward_equals_separate_forwards_and_naive_packing_does_not():
    model, exs = tiny_gpt(), examples(4, seed=2)
    packed = collate_packed([exs[:2], exs[2:]], EOS)  # two rows of two examples, padded to the longer row
    with torch.no_grad():
        got = model(packed.inputs, position_ids=packed.position_ids, document_ids=packed.document_ids).logits
        naive = model(packed.inputs).logits  # one causal sequence per row: examples see their neighbours
        for r, row in enumerate((exs[:2], exs[2:])):
            start = 0
            for x, _ in row:
                alone = model(torch.tensor([x])).logits[0]
                torch.testing.assert_close(got[r, start:start + len(x)], alone, rtol=0, atol=1e-5)
                start += len(x)
    second = slice(len(exs[0][0]), len(exs[0][0]) + len(exs[1][0]))
    assert (naive[0, second] - got[0, second]).abs().max() > 1e-2  # the control: cross-talk shows


def test_packed_loss_equals_the_unpacked_loss():
    model, exs = tiny_gpt(), examples(6, seed=3, mask_prompt=True)
    padded = pad_examples(exs, EOS)
    packed = collate_packed([exs[:3], exs[3:]], EOS)
    assert padded.target_tokens == packed.target_tokens
    with torch.no_grad():
        unpacked = model(**padded.model_inputs()).loss
        joined = model(**packed.model_inputs()).loss
        naive = model(packed.inputs, targets=packed.targets).loss
    torch.testing.assert_close(joined, unpacked, rtol=0, atol=1e-5)
    assert abs(naive.item() - unpacked.item()) > 1e-4  # an untrained model: small, yet 10x the tolerance above


def test_epoch_batches_shuffle_per_epoch_drop_last_and_shard_without_overlap():
    rows = [[e] for e in examples(23)]
    collate = row_collate(False, EOS)
    def ten(loader: EpochBatches) -> list:
        return [tuple(map(tuple, b["input_ids"].tolist())) for b, _ in zip(loader, range(10))]

    first = ten(EpochBatches(rows, collate, 4, 0, 1, 7))
    # 23 rows / 4 = 5 batches per epoch (3 rows dropped); epoch 2 is a new order
    assert len(set(first[:5])) == 5 and first[:5] != first[5:]
    assert ten(EpochBatches(rows, collate, 4, 0, 1, 7)) == first  # seeded
    ranks = [EpochBatches(rows, collate, 2, r, 2, 7) for r in (0, 1)]
    assert ranks[0].per_epoch == ranks[1].per_epoch == 5
    seen = [tuple(x) for r in ranks for b, _ in zip(r, range(5)) for x in b["input_ids"].tolist()]
    assert len(seen) == len(set(seen)) == 20  # one epoch over both ranks: no row twice


def test_epoch_batches_resume_at_the_exact_batch():
    rows = [[e] for e in examples(20)]
    collate = row_collate(True, EOS)
    full = EpochBatches(rows, collate, 3, 0, 1, 1)
    it = iter(full)
    reference = [next(it)["input_ids"] for _ in range(12)]
    part = EpochBatches(rows, collate, 3, 0, 1, 1)
    it = iter(part)
    for _ in range(7):  # into the second epoch (6 batches each)
        next(it)
    resumed = EpochBatches(rows, collate, 3, 0, 1, 1)
    resumed.load_state_dict(part.state_dict())
    it = iter(resumed)
    for want in reference[7:]:
        assert torch.equal(next(it)["input_ids"], want)
    with pytest.raises(ValueError, match="data state is for 20 rows on 1"):
        EpochBatches(rows, collate, 3, 0, 2, 1).load_state_dict(part.state_dict())


def test_ordered_batches_keep_the_last_batch_and_split_ranks():
    rows = [[e] for e in examples(10)]
    collate = row_collate(False, EOS)
    alone = ordered_batches(rows, collate, 4, 0, 1)
    assert [len(b["input_ids"]) for b in alone] == [4, 4, 2]
    pair = [ordered_batches(rows, collate, 4, r, 2) for r in (0, 1)]
    assert [len(b["input_ids"]) for b in pair[0]] == [4, 2] and [len(b["input_ids"]) for b in pair[1]] == [4]
    assert len(ordered_batches(rows, collate, 4, 0, 1, limit=2)) == 2
    assert all((b["targets"] != IGNORE).any() for b in alone)
