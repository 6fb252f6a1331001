"""LoRA over `nn.Linear` (Hu et al., 2021), in plain torch: y = W x + (alpha / r) B A dropout(x).

B starts at zero, so an adapted model starts exactly as its base. A tied embedding / LM head (GPT-2's) is refused
as a target: an adapter there would change the input embeddings too, and merging it corrupts them; an untied
`lm_head` (llama's default) is an ordinary Linear and may be adapted. `merge_lora` folds every adapter back into a
plain `nn.Linear`, so the result saves and loads as an ordinary GPT-2 / Llama / Qwen3.
"""
from __future__ import annotations

import math

import torch
from torch import nn

TIED = ("lm_head", "wte")  # when tied to each other (GPT-2): an adapter on one silently changes the other


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> [..., r] -> [..., out]
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective W + scale * B A (differentiable; no dropout), for code that multiplies by a Linear's
        weight itself (the chunked cross-entropy reads `lm_head.weight`)."""
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a).to(self.base.weight.dtype)

    def merged(self) -> nn.Linear:
        """The plain Linear with W + scale * B A."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a).to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Freeze the model and put an adapter on every Linear whose name ends with a target; the names adapted."""
    refused = [t for t in targets if t.split(".")[-1] in TIED and _tied_head(model)]
    if refused:
        raise ValueError(f"LoRA targets {refused}: the LM head is tied to the token embedding, and an adapter on "
                         "it would change both (and corrupt them when merged); target attention or MLP layers")
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(targets))]
    if not names:
        raise ValueError(f"LoRA targets {targets} match no Linear layer (e.g. attn.c_attn, attn.c_proj, mlp.c_fc)")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def _tied_head(model: nn.Module) -> bool:
    """Whether the model's LM head shares its weight with the token embedding (GPT-2; llama only when asked)."""
    head, wte = getattr(model, "lm_head", None), getattr(model, "wte", None)
    return head is None or wte is None or head.weight is wte.weight


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear, in place: the model becomes a plain one again."""
    for name in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _replace(model, name, model.get_submodule(name).merged())
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights only (what a LoRA run saves beside its merged model)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def merged_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the adapted model's state dict) with every adapter folded into its Linear: plain model weights,
    for checkpoints that transformers loads while the run goes on (the model itself stays adapted)."""
    out = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            base, a, b = out.pop(f"{name}.base.weight"), out.pop(f"{name}.lora_a"), out.pop(f"{name}.lora_b")
            out[f"{name}.weight"] = base + module.scale * (b.float() @ a.float()).to(base.dtype)
            if f"{name}.base.bias" in out:
                out[f"{name}.bias"] = out.pop(f"{name}.base.bias")
    return out
