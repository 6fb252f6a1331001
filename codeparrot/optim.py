"""The optimizers of the train loop: AdamW alone, or Muon on the blocks' weight matrices with AdamW on the rest.

`build_optimizer` returns one `torch.optim.Optimizer` either way, so accelerate's prepare, save_state and
load_state and the loop's per-step learning rate treat both alike. A group may carry `lr_ratio`: its learning rate
over `train.learning_rate`, which `train_step` multiplies the step's learning rate by (Muon's groups).
"""
from __future__ import annotations

from collections import ChainMap, OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import ConfigError, TrainConfig

# Moonshot's adjustment (torch's adjust_lr_fn): Muon's update of an A x B matrix is scaled by 0.2 * sqrt(max(A, B)),
# which gives it AdamW's update RMS whatever the matrix's shape, so AdamW's learning rate and weight decay carry
# over, and one learning rate holds across widths ("Muon is Scalable for LLM Training", 2025).
MUON_ADJUST_LR = "match_rms_adamw"


def embedding_ids(model: nn.Module) -> set[int]:
    """ids of the embedding tables' weights (token, position; an LM head tied to the token table is one of them)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside the transformer blocks (attention and MLP projections): Muon's share.

    Embeddings and the LM head live outside the blocks and norms and biases are 1-D, so all of those stay on AdamW.
    """
    embeddings = embedding_ids(model)  # never on Muon, even if a model kept one inside its blocks
    return [p for p in model.h.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in embeddings]


def adamw_groups(model: nn.Module, weight_decay: float, embedding_decay: bool = True,
                 exclude: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """AdamW's two groups, in parameter order: matrices (and embeddings, if `embedding_decay`) decay; the rest not."""
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in exclude]
    no_decay = set() if embedding_decay else embedding_ids(model)
    decays = [p.dim() >= 2 and id(p) not in no_decay for p in params]
    # the same two groups, in the same order, as GPT.optimizer_groups: checkpoints of earlier runs still load
    return [{"params": [p for p, d in zip(params, decays) if d], "weight_decay": weight_decay},
            {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0}]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped, zeroed, saved and loaded as one optimizer over disjoint parameters."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        # Not Optimizer.__init__: it would copy the groups and keep a state of its own. This object is a view of
        # the two optimizers' own group dicts, so what the loop or accelerate writes into a group (its lr, its
        # params) is what the inner optimizer steps with.
        self.muon, self.adamw = muon, adamw
        self.defaults: dict[str, Any] = {}
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Muon's groups, then AdamW's: the same dicts, so setting group["lr"] reaches the inner optimizer."""
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> ChainMap:  # type: ignore[override]
        """Per-parameter state of both (read-only view)."""
        return ChainMap(self.muon.state, self.adamw.state)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One step of each optimizer (the closure, if any, runs once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of both optimizers' parameters."""
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """{"muon": ..., "adamw": ...}: each optimizer's own state dict."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what `state_dict` returned; a plain AdamW checkpoint is refused with the reason."""
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this optimizer state was not saved by train.optimizer=muon")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: a group must be added to the inner optimizer it belongs to."""
        raise TypeError("MuonWithAdamW takes no new group: add it to .muon or .adamw, the optimizer it belongs to")

    def __repr__(self) -> str:
        return f"MuonWithAdamW(\n{self.muon!r},\n{self.adamw!r})"


def build_optimizer(model: nn.Module, t: TrainConfig, fused_adamw: bool = False,
                    fsdp: bool = False) -> torch.optim.Optimizer:
    """AdamW (`train.optimizer: adamw`), or Muon on the hidden matrices and AdamW on the rest (`muon`)."""
    betas = (t.adam_beta1, t.adam_beta2)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(adamw_groups(model, t.weight_decay, t.embedding_weight_decay), lr=t.learning_rate,
                                 betas=betas, fused=fused_adamw)
    if fsdp:  # Newton-Schulz orthogonalises whole matrices; FSDP2 gives each rank a shard of each
        raise ConfigError("train.optimizer=muon does not run under FSDP (it needs whole weight matrices): "
                          "use DDP or train.optimizer=adamw")
    hidden = hidden_matrices(model)
    lr = t.muon_learning_rate if t.muon_learning_rate is not None else t.learning_rate
    wd = t.muon_weight_decay if t.muon_weight_decay is not None else t.weight_decay
    # lr_ratio: the loop sets each step's lr as the schedule's lr of train.learning_rate times this
    muon = torch.optim.Muon([{"params": hidden, "lr_ratio": lr / t.learning_rate}], lr=lr, weight_decay=wd,
                            momentum=t.muon_momentum, adjust_lr_fn=MUON_ADJUST_LR)
    rest = adamw_groups(model, t.weight_decay, t.embedding_weight_decay, frozenset(map(id, hidden)))
    return MuonWithAdamW(muon, torch.optim.AdamW(rest, lr=t.learning_rate, betas=betas, fused=fused_adamw))
