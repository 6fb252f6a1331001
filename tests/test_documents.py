"""Which attention kernel packed rows take: flash's variable-length kernel only where it runs (CUDA from sm80 on,
half precision, no dropout); elsewhere the dense mask, whose outputs tests/test_sft_loader.py checks against
separate forwards (test_packed_forward_equals_separate_forwards_and_naive_packing_does_not)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from codeparrot import documents


def ids_on_cuda(monkeypatch, capability: tuple[int, int]) -> SimpleNamespace:
    """Stand-in input ids on a CUDA device of this compute capability, on a machine that may have none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if documents.varlen_attn is None:  # a torch without the kernel: stand one in, the decision is what is tested
        monkeypatch.setattr(documents, "varlen_attn", lambda *args, **kwargs: None)
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


@pytest.mark.parametrize("capability, varlen", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_varlen_attention_only_from_ampere_on(monkeypatch, capability, varlen):
    ids = ids_on_cuda(monkeypatch, capability)
    assert documents.use_varlen(ids, torch.bfloat16, 0.0) is varlen  # a T4 (7.5) or V100 (7.0): the mask
    assert documents.use_varlen(ids, torch.float16, 0.0) is varlen
    assert not documents.use_varlen(ids, torch.float32, 0.0)
    assert not documents.use_varlen(ids, torch.bfloat16, 0.1)


def test_cpu_rows_take_the_mask():
    assert not documents.use_varlen(torch.zeros(1, 4, dtype=torch.long), torch.bfloat16, 0.0)


# --- data.document_mask: pretraining blocks whose documents end with EOS ---------------------------

EOS = 0


def test_eos_documents_restart_after_each_eos():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 1, 2, 3, 4, 5, 6, 7]])
    position_ids, document_ids = documents.eos_documents(ids, EOS)
    assert position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert document_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    p1, d1 = documents.eos_documents(ids[0], EOS)  # one block [T] as a batch row
    assert p1.tolist() == position_ids[0].tolist() and d1.tolist() == document_ids[0].tolist()


def block_of_documents(seed: int, T: int = 24) -> tuple[torch.Tensor, list[list[int]]]:
    """A block [T] of whole documents (each ending with EOS) and a partial last one, and those documents."""
    g = torch.Generator().manual_seed(seed)
    docs, n = [], 0
    for length in (5, 1, 7):  # a one-token document too: just its EOS
        docs.append(torch.randint(1, 50, (length - 1,), generator=g).tolist() + [EOS])
        n += length
    docs.append(torch.randint(1, 50, (T - n,), generator=g).tolist())  # cut by the block's end
    return torch.tensor([t for d in docs for t in d]), docs


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_masked_block_forward_equals_separate_forwards_of_its_documents(arch):
    from codeparrot.model import GPT, GPTConfig, batch_inputs

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_positions=32, n_layer=2, n_head=2, n_embd=32, arch=arch)).eval()
    rows = [block_of_documents(seed) for seed in (1, 2)]
    batch = torch.stack([r[0] for r in rows])
    position_ids, document_ids = documents.eos_documents(batch, EOS)
    inputs = batch_inputs({"input_ids": batch, "position_ids": position_ids, "document_ids": document_ids},
                          torch.device("cpu"))
    with torch.no_grad():
        out = model(**inputs)
        plain = model(**batch_inputs(batch, torch.device("cpu")))
        for r, (_, docs) in enumerate(rows):
            start = 0
            for doc in docs:  # positions restart (learned or RoPE): the document alone, from position 0
                alone = model(torch.tensor([doc])).logits[0]
                torch.testing.assert_close(out.logits[r, start:start + len(doc)], alone, rtol=0, atol=1e-5)
                start += len(doc)
    assert (out.logits - plain.logits).abs().max() > 1e-2  # the control: without the mask the documents mix
    # The loss is over every B * (T - 1) target, EOS -> next document's first token included
    logp = out.logits[:, :-1].log_softmax(-1).gather(-1, batch[:, 1:, None])
    torch.testing.assert_close(out.loss, -logp.mean(), rtol=0, atol=1e-5)


def test_document_batches_weigh_as_blocks_and_off_stays_a_tensor():
    from codeparrot.model import batch_inputs, count_real_tokens, count_targets
    from codeparrot.train import micro_weights

    batch = torch.stack([block_of_documents(s)[0] for s in (1, 2, 3)])  # [3, 24]
    plain = batch_inputs(batch, torch.device("cpu"))
    assert set(plain) == {"input_ids", "labels"} and plain["labels"] is plain["input_ids"]
    position_ids, document_ids = documents.eos_documents(batch, EOS)
    masked = batch_inputs({"input_ids": batch, "position_ids": position_ids, "document_ids": document_ids},
                          torch.device("cpu"))
    assert set(masked) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert torch.equal(masked["labels"], batch) and "targets" not in masked  # not a fine-tuning batch
    assert count_targets(masked) == count_targets(plain) == 3 * 23
    assert count_real_tokens(masked) == count_real_tokens(plain) == 3 * 24
    weights, tokens = micro_weights([masked, masked], SimpleNamespace(num_processes=1))
    assert weights == [0.5, 0.5] and tokens is None  # as blocks: no count, no host sync
