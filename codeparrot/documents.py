"""Attention within documents: a packed row holds several documents, and each may attend only to itself.

A batch names each position's document (`document_ids` [B, T], equal ids in one contiguous run). The attention is
causal inside a document and blind across documents (block-diagonal causal). On CUDA under half precision that is
torch's variable-length (flash) attention over the flattened batch, which skips the masked blocks; elsewhere it is
SDPA with an explicit boolean mask (CPU, GPUs before Ampere, fp32, dropout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10 has no variable-length attention: the mask serves everywhere
    varlen_attn = None


@dataclass
class Documents:
    """Where a batch's documents lie, in the form its attention kernel takes: one of `mask` or `cu_seqlens`."""

    mask: Optional[torch.Tensor] = None  # [B, 1, T, T] bool: query t may attend key s
    cu_seqlens: Optional[torch.Tensor] = None  # [n_docs + 1] int32: document starts in the flattened [B * T] batch
    max_len: int = 0  # longest document (varlen wants it on the host)


VARLEN_MIN_CAPABILITY = (8, 0)  # flash attention's kernels run on Ampere (sm80) and newer only


def use_varlen(input_ids: torch.Tensor, dtype: torch.dtype, dropout: float) -> bool:
    """Whether the flash variable-length kernel can run: CUDA from sm80 on, half precision (autocast or weights),
    no dropout."""
    if varlen_attn is None or not input_ids.is_cuda or dropout > 0:
        return False
    if torch.cuda.get_device_capability(input_ids.device) < VARLEN_MIN_CAPABILITY:  # a T4 or V100: the mask
        return False
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    return dtype in (torch.float16, torch.bfloat16)


def locate_documents(document_ids: torch.Tensor, varlen: bool) -> Documents:
    """The block-diagonal causal structure of document_ids [B, T], computed once per forward for every layer."""
    B, T = document_ids.shape
    if not varlen:
        causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
        same = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
        return Documents(mask=(same & causal)[:, None])
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # a row's first position always starts one
    begin = starts.flatten().nonzero().flatten()
    cu = torch.cat([begin, begin.new_tensor([B * T])]).to(torch.int32)
    return Documents(cu_seqlens=cu, max_len=int((cu[1:] - cu[:-1]).max()))  # one host sync per forward


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, scale: float,
                       dropout_p: float) -> torch.Tensor:
    """Attention of q, k, v [B, H, T, D] within documents; [B, H, T, D]."""
    if docs.cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask, dropout_p=dropout_p, scale=scale)
    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]  # [B*T, H, D]: rows end to end
    y = varlen_attn(*flat, docs.cu_seqlens, docs.cu_seqlens, docs.max_len, docs.max_len, scale=scale,
                    window_size=(-1, 0))  # (-1, 0): causal (the default, (-1, -1), is not)
    return y.view(B, T, H, D).transpose(1, 2)


def eos_documents(input_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, document_ids), each shaped like `input_ids` [..., T], of token blocks whose documents end
    with `eos_token_id` (pretraining's packing, data.document_mask): a document ends with its EOS and the token
    after an EOS starts the next. Each row's first token starts a document (a block may begin mid-document: its
    positions count from the block's start), and document ids count from 0 in each row."""
    T = input_ids.size(-1)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[..., 1:] = input_ids[..., :-1] == eos_token_id
    document_ids = starts.long().cumsum(-1)  # [..., T]
    index = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values  # where each one's document began
    return index - first, document_ids
