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
