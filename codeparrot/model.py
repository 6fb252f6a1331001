"""GPT-2 and a Llama-style variant in plain torch (SDPA attention), size presets, and save/load in Hugging Face's
formats (hf_export.py).

`arch` picks the pieces of one Block: gpt2 has learned positions, LayerNorm, a GELU MLP and biases; llama has RoPE,
RMSNorm, a SwiGLU MLP, no biases, grouped-query attention (n_kv_head) and optional QK-norm (as Qwen3).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from codeparrot.config import ModelConfig
from codeparrot.documents import Documents, document_attention, locate_documents, use_varlen
from codeparrot.hf_export import INIT_STD, config_kwargs, from_hf_tensors, hf_config, to_hf_tensors
from codeparrot.losses import chunked_cross_entropy, cross_entropy_with_z_loss

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 128},  # CPU, trains in minutes
    "small": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # GPT-2 124M shape; ~110M with vocab 32768
    "large": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # GPT-2 XL shape; ~1.5B
}

LAYER_NORM_EPS = 1e-5  # as GPT-2 (and Llama 2/3's RMSNorm)
SWIGLU_MULTIPLE = 256  # llama's default MLP width, 8/3 x n_embd, is rounded up to this
ARCHS = ("gpt2", "llama")
SDPA_BACKENDS = {
    "auto": None,  # let torch pick (flash or cuDNN on recent GPUs, else memory-efficient, else math)
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


@dataclass
class GPTConfig:
    """The concrete shape and options of one GPT model; the fields left as None are filled from `arch`."""

    vocab_size: int
    n_positions: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    gradient_checkpointing: bool = False
    vocab_pad_multiple: int = 1  # embedding rows rounded up to this (64 keeps the LM-head matmul aligned)
    loss_chunk_size: int = 0  # > 0: chunked cross-entropy that never holds [B*T, V] logits
    attention_backend: str = "auto"
    arch: str = "gpt2"
    n_kv_head: Optional[int] = None  # None: n_head (no grouping)
    intermediate_size: Optional[int] = None  # None: 4 x n_embd (gpt2), 8/3 x n_embd rounded up to 256 (llama)
    rope_theta: float = 10000.0  # llama
    norm_eps: float = LAYER_NORM_EPS
    qk_norm: bool = False  # llama
    tie_embeddings: Optional[bool] = None  # None: tied for gpt2, untied for llama

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attention_backend not in SDPA_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r}; valid: {', '.join(SDPA_BACKENDS)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd if self.arch == "gpt2" else \
                -(-8 * self.n_embd // (3 * SWIGLU_MULTIPLE)) * SWIGLU_MULTIPLE
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch == "gpt2"
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.arch == "gpt2":
            llama_only = [k for k, on in (("n_kv_head", self.n_kv_head != self.n_head), ("qk_norm", self.qk_norm))
                          if on]
            if llama_only:
                raise ValueError(f"{', '.join(llama_only)}: llama only (the GPT-2 format has no place for it)")
        else:
            if self.scale_attn_by_inverse_layer_idx:
                raise ValueError("scale_attn_by_inverse_layer_idx: gpt2 only (the Llama format has no place for it)")
            if self.head_dim % 2:
                raise ValueError(f"RoPE needs an even head dimension; n_embd / n_head = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding matrix: the vocab rounded up to `vocab_pad_multiple`."""
        m = max(1, self.vocab_pad_multiple)
        return (self.vocab_size + m - 1) // m * m


def resolve_model_config(cfg: ModelConfig, vocab_size: int, seq_length: int) -> GPTConfig:
    """Fill the fields `cfg` leaves as None from its preset, the tokenizer's vocab and the data's seq_length."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset {cfg.preset!r}; valid presets: {', '.join(PRESETS)}")
    shape = dict(PRESETS[cfg.preset])
    for key in ("n_layer", "n_head", "n_embd"):
        if getattr(cfg, key) is not None:
            shape[key] = getattr(cfg, key)
    return GPTConfig(
        vocab_size=cfg.vocab_size if cfg.vocab_size is not None else vocab_size,
        n_positions=cfg.n_positions if cfg.n_positions is not None else seq_length,
        dropout=cfg.dropout,
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=cfg.reorder_and_upcast_attn,
        gradient_checkpointing=cfg.gradient_checkpointing,
        vocab_pad_multiple=cfg.vocab_pad_multiple,
        loss_chunk_size=cfg.loss_chunk_size,
        attention_backend=cfg.attention_backend,
        arch=cfg.arch,
        n_kv_head=cfg.n_kv_head,
        intermediate_size=cfg.intermediate_size,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        qk_norm=cfg.qk_norm,
        tie_embeddings=cfg.tie_embeddings,
        **shape,
    )


class KVCache:
    """Static keys and values per layer, each [B, n_kv_head, max_len, head_dim], written in place as decoding goes.

    Keys are cached after RoPE, at their absolute positions, so a decode step rotates only its own query and key."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        # allocated on first write, so that they take the dtype (autocast) and device of the keys
        self.k: list[Optional[torch.Tensor]] = [None] * n_layer
        self.v: list[Optional[torch.Tensor]] = [None] * n_layer

    def update(self, layer: int, start_pos: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv_head, T, head_dim] at start_pos; return the keys and values of positions
        [0, start_pos+T)."""
        end = start_pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to position {end}")
        if self.k[layer] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_rows(self, n: int) -> None:
        """Copy each row n times: one prefilled prompt becomes the cache of its n samples."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices [B']): finished samples leave the batch."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight, as transformers' Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def make_norm(config: GPTConfig, dim: Optional[int] = None) -> nn.Module:
    """The arch's normalisation over the last `dim` (default n_embd) features."""
    dim = dim or config.n_embd
    return nn.LayerNorm(dim, eps=config.norm_eps) if config.arch == "gpt2" else RMSNorm(dim, config.norm_eps)


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, head_dim] or [B, 1, T, head_dim], fp32


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> Rope:
    """cos and sin of RoPE at `positions` ([T] or [B, T]), in the half-split layout of transformers' Llama: feature
    i and i + head_dim/2 rotate together at frequency theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [..., T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, head_dim]
    if emb.dim() == 3:
        emb = emb[:, None]  # [B, 1, T, head_dim]: broadcast over heads
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by RoPE (fp32 tables, result in x's dtype)."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with a fused qkv projection ([q; k; v] rows); with n_kv_head < n_head each key/value
    head serves a group of query heads; llama rotates q and k by RoPE (after QK-norm, when on)."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KVCache slot this layer writes
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        self.reorder_and_upcast = config.reorder_and_upcast_attn
        self.backends = SDPA_BACKENDS[config.attention_backend]
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1  # Stanford Mistral's stability trick, as in HF GPT-2: deeper layers get softer scores
        bias = config.arch == "gpt2"
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=bias)
        self.q_norm = self.k_norm = None
        if config.qk_norm:  # per-head RMSNorm of queries and keys (Qwen3)
            self.q_norm, self.k_norm = make_norm(config, self.head_dim), make_norm(config, self.head_dim)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None, start_pos: int = 0,
                docs: Optional[Documents] = None, rope: Optional[Rope] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        # [B, T, (H + 2K) D] -> [B, H, T, D], [B, K, T, D], [B, K, T, D]
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in self.c_attn(x).split([H * D, K * D, K * D], dim=2))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k = q.to(v.dtype), k.to(v.dtype)  # the norms' fp32 weights promote under autocast
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)  # [B, K, start_pos + T, D]
        if K != H:  # each key/value head serves H/K consecutive query heads
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is not None:
            y = self._cached_attention(q, k, v, start_pos)
        elif self.reorder_and_upcast:
            y = self._upcast_attention(q, k, v, dropout_p, None if docs is None else docs.mask)
        elif docs is not None:  # packed rows: each document attends only to itself
            y = document_attention(q, k, v, docs, self.scale, dropout_p)
        elif self.backends is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale)
        else:
            with sdpa_kernel(self.backends):
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # [B, H, T, D] -> [B, T, H D]
        return self.resid_dropout(self.c_proj(y))

    def _cached_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Attention of T new positions (start_pos onwards) over the cached prefix and themselves (k, v hold
        positions [0, start_pos + T)); inference only."""
        T = q.size(-2)
        mask = None  # prefill from 0 is plain causal; a single decode query sees every cached key
        if start_pos > 0 and T > 1:
            # query i sits at position start_pos + i and sees keys 0 .. start_pos + i: [T, start_pos + T]
            mask = (torch.arange(start_pos + T, device=q.device)[None, :]
                    <= torch.arange(start_pos, start_pos + T, device=q.device)[:, None])
        causal = start_pos == 0 and T > 1
        if self.reorder_and_upcast:  # fp32 scores, as the uncached path
            with torch.autocast(device_type=q.device.type, enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   is_causal=causal, scale=self.scale)
            return y.to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)

    def _upcast_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores and softmax in fp32 even under autocast, so that half-precision scores cannot overflow; `mask`
        [B, 1, T, T] (documents) replaces the causal one."""
        T = q.size(-2)
        with torch.autocast(device_type=q.device.type, enabled=False):
            att = (q.float() * self.scale) @ k.float().transpose(-2, -1)  # [B, n_head, T, T]
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        att = F.dropout(att.to(v.dtype), p=dropout_p, training=dropout_p > 0)
        return att @ v  # [B, n_head, T, head_dim]


class MLP(nn.Module):
    """gpt2: GELU (tanh-approximated) MLP. llama: SwiGLU, silu(gate) * up, with gate and up fused in c_fc."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.arch == "llama"
        width, bias = config.intermediate_size, not self.swiglu
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * width, bias=bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """One pre-norm transformer block (LayerNorm or RMSNorm, per arch)."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None, start_pos: int = 0,
                docs: Optional[Documents] = None, rope: Optional[Rope] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos, docs, rope)
        return x + self.mlp(self.ln_2(x))


class GPTOutput(NamedTuple):
    """Logits [B, T, V] and, when labels were given, the mean next-token loss."""

    logits: Optional[torch.Tensor]  # None when the chunked loss ran instead
    loss: Optional[torch.Tensor]


class GPT(nn.Module):
    """Token embedding (+ learned positions for gpt2; RoPE in attention for llama), pre-norm blocks, final norm, LM
    head tied to the embedding or not."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        # learned positions (gpt2); llama rotates q and k instead
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if config.arch == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation (llama's too); also materialises a model built on `meta` once `to_empty` gave it
        storage."""
        # nn.init on meta tensors is a no-op, so building on the meta device stays cheap
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()  # weight 1, bias 0 (to_empty leaves garbage there)
        # GPT-2 scales the residual projections by 1/sqrt(2L): each block adds two of them to the stream
        resid_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, start_pos: int = 0, *, targets: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                z_loss: float = 0.0) -> GPTOutput:
        """Logits for `input_ids` [B, T], and the mean loss over targets that are not -100:

        - `labels` [B, T] are shifted inside, as transformers does: labels[t+1] is the target at t (pretraining
          passes labels = input_ids);
        - `targets` [B, T] are already aligned: targets[t] is the target at t (fine-tuning's collate).

        Packed rows pass `position_ids` [B, T] (restarting at each document: the learned positions or RoPE's) and
        `document_ids` [B, T], which keep attention inside each document. With `kv_cache`, input_ids are positions
        start_pos .. start_pos+T-1, attending to the cached prefix too. `z_loss` > 0 adds that multiple of the mean
        log(Z)^2 over the targets (PaLM's auxiliary loss; training only).
        """
        B, T = input_ids.shape
        cfg = self.config
        if start_pos + T > cfg.n_positions:
            raise ValueError(f"sequence length {start_pos + T} exceeds n_positions {cfg.n_positions}")
        pos = torch.arange(start_pos, start_pos + T, device=input_ids.device) if position_ids is None else position_ids
        x = self.wte(input_ids)  # [B, T, C]
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = rope_tables(pos, cfg.head_dim, cfg.rope_theta)  # once per forward, shared by every layer
        x = self.drop(x)
        docs = None if document_ids is None else locate_documents(
            document_ids, use_varlen(input_ids, self.wte.weight.dtype, cfg.dropout * self.training))
        for block in self.h:
            if cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # trade compute for memory: keep only block inputs, recompute activations in backward
                x = checkpoint(block, x, None, 0, docs, rope, use_reentrant=False)
            else:
                x = block(x, kv_cache, start_pos, docs, rope)
        h = self.ln_f(x)  # [B, T, C]
        if labels is not None:
            targets = labels[:, 1:]  # [B, T-1]: the hidden state at t predicts labels[t+1]
        n = T if targets is None else targets.size(1)  # positions that have a target: T-1 (labels) or T
        if targets is not None and cfg.loss_chunk_size > 0:
            loss = chunked_cross_entropy(h[:, :n].reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                         cfg.vocab_size, cfg.loss_chunk_size, z_loss)
            return GPTOutput(None, loss)
        logits = self.lm_head(h)[..., : cfg.vocab_size]  # [B, T, V]: padding rows are never predicted
        loss = None
        if targets is not None:
            flat, flat_targets = logits[:, :n].reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
            loss = F.cross_entropy(flat, flat_targets, ignore_index=-100) if z_loss <= 0 else \
                cross_entropy_with_z_loss(flat, flat_targets, z_loss)
        return GPTOutput(logits, loss)

    def _lookups(self) -> list[nn.Parameter]:
        """Embedding tables that are only indexed, never multiplied: wpe, and wte when the head has its own."""
        out = [self.wpe.weight] if self.wpe is not None else []
        return out if self.config.tie_embeddings else out + [self.wte.weight]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied wte/lm_head counted once; optionally without wte and wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*H*Q*T.

        N counts every matrix a token is multiplied by: the LM head (a tied wte, once), fused qkv with GQA's
        smaller k and v, SwiGLU's three matrices; embeddings that are only looked up (wpe, an untied wte) are left
        out. The attention term counts the query heads: grouping shrinks k and v, not the scores."""
        n = self.num_parameters() - sum(p.numel() for p in self._lookups())
        cfg = self.config
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices and embeddings decay; biases and norm weights (all 1-D) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]


def batch_inputs(batch: torch.Tensor | dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The forward's keyword arguments for a batch on `device`: a token block [B, T] is its own labels
    (pretraining); a dict (fine-tuning's collate) names input_ids and targets, and position_ids and document_ids
    when its rows are packed. A dict without targets (pretraining under data.document_mask: input_ids,
    position_ids, document_ids) is a token block too: its input_ids are its labels."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return {"input_ids": batch, "labels": batch}
    inputs = {key: t.to(device, non_blocking=True) for key, t in batch.items()}
    if "targets" not in inputs and "labels" not in inputs:
        inputs["labels"] = inputs["input_ids"]
    return inputs


def count_targets(inputs: dict[str, torch.Tensor]) -> int | torch.Tensor:
    """Positions the loss of `inputs` averages over: B * (T - 1) for a token block, with or without document ids
    (known without a device sync), the targets that are not -100 (a device tensor) for a fine-tuning batch."""
    if "targets" not in inputs:
        ids = inputs["input_ids"]
        return ids.size(0) * (ids.size(1) - 1)
    return (inputs["targets"] != -100).sum()


def count_real_tokens(inputs: dict[str, torch.Tensor]) -> int | torch.Tensor:
    """Input tokens that are not padding (what tokens/s and MFU count): all of a token block; in a fine-tuning
    batch, each row up to its last supervised position (sft/collate.py pads after it, with targets -100)."""
    if "targets" not in inputs:
        return inputs["input_ids"].numel()
    targets = inputs["targets"]  # [B, T]
    positions = torch.arange(1, targets.size(1) + 1, device=targets.device)
    return torch.where(targets != -100, positions, 0).amax(dim=1).sum()  # sum over rows of (last target + 1)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (of its local shard under FSDP): where its inputs must be made."""
    return next(model.parameters()).device


def save_hf(model: GPT, directory: str | os.PathLike, eos_token_id: int = 0,
            state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write `config.json` and `model.safetensors` that transformers loads as is (`AutoModelForCausalLM`):
    GPT2LMHeadModel, LlamaForCausalLM, or Qwen3ForCausalLM (llama with QK-norm); see hf_export.py.

    Pass `state_dict` when the weights live elsewhere (e.g. gathered from FSDP shards).
    """
    # hand-written because transformers' model would need a second copy in memory just to save ours
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model.config, eos_token_id), indent=2) + "\n")
    tensors = to_hf_tensors(model.config, state_dict if state_dict is not None else model.state_dict())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_hf(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> GPT:
    """Read a GPT-2, Llama or Qwen3 `config.json` + `model.safetensors` (ours or transformers') back into a GPT."""
    src = Path(directory)
    config = GPTConfig(**config_kwargs(json.loads((src / "config.json").read_text())))
    state = from_hf_tensors(config, load_file(str(src / "model.safetensors"), device=str(map_location)))
    for name in ("wte.weight", "lm_head.weight"):
        pad = config.padded_vocab_size - state[name].size(0) if name in state else 0
        if pad > 0:
            state[name] = F.pad(state[name], (0, 0, 0, pad))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    with torch.device("meta"):  # skip random init: every tensor is about to be replaced
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True made two Parameters; tie them again
    return model


@torch.no_grad()
def generate(
    model: GPT, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: Optional[int] = None
) -> torch.Tensor:
    """Greedy decoding: append up to `max_new_tokens` to `input_ids` [B, T]; stop once every row emitted EOS."""
    was_training = model.training
    model.eval()
    ids = input_ids
    finished = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        context = ids[:, -model.config.n_positions :]  # no KV cache: re-run the cropped window each step
        next_id = model(context).logits[:, -1].argmax(dim=-1)  # [B]
        if eos_token_id is not None:
            next_id = torch.where(finished, torch.full_like(next_id, eos_token_id), next_id)  # pad finished rows
            finished |= next_id == eos_token_id
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        if finished.all():
            break
    model.train(was_training)
    return ids
