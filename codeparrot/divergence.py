"""What a training step may not do: update on a non-finite loss or gradient (it stops the run), or, when asked, on a
spike (it skips the update).

torchtitan's rule: a `nan`/`inf` loss or grad norm on any rank stops every rank before the optimizer step, so no
checkpoint, push or prune ever follows it. OLMo-core's SkipStepAdamW: with `train.skip_spikes`, a step whose loss or
grad norm passes the rolling mean + k·σ of the last steps keeps its weights (the update is skipped and counted).
Shared by `train` and `sft`, which run the same loop.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports TrainingDiverged without paying for torch
    import torch


class TrainingDiverged(RuntimeError):
    """A non-finite loss or grad norm: the run stopped before its optimizer step, and nothing was saved after it."""


@dataclass
class StepCheck:
    """The step's numbers as every rank sees them (one all-reduce, one host sync per optimizer step)."""
    losses: list[float]  # each rank's share of the step's loss; their mean is the step's loss
    grad_norm: float  # global, the same on every rank

    @property
    def bad_ranks(self) -> list[int]:
        return [r for r, v in enumerate(self.losses) if not math.isfinite(v)]

    @property
    def finite(self) -> bool:
        return not self.bad_ranks and math.isfinite(self.grad_norm)

    @property
    def loss(self) -> float:
        return statistics.fmean(self.losses)


def check_step(loss: torch.Tensor, grad_norm: torch.Tensor, rank: int, world: int, reduce) -> StepCheck:
    """Every rank's loss, summed into its own slot (0 + nan stays in that slot); `reduce` is accelerator.reduce."""
    import torch

    losses = torch.zeros(world, device=loss.device)  # [world]
    losses[rank] = loss.detach().float()
    if world > 1:
        losses = reduce(losses, reduction="sum")
    return StepCheck(losses.tolist(), float(grad_norm))


def diverged_message(step: int, check: StepCheck, last_good: str, section: str) -> str:
    """One line: the step, the values, the ranks, the last good checkpoint, and the key to change."""
    losses = ", ".join(f"{v:.4g}" for v in check.losses)
    where = f" on rank {', '.join(map(str, check.bad_ranks))} (losses by rank: {losses})" if len(check.losses) > 1 \
        else ""
    return (f"training diverged at step {step}: loss {check.loss:.4g}{where}, grad norm {check.grad_norm:.4g}; "
            f"stopped before the optimizer step, nothing saved after it; {what_next(last_good, section)}")


def what_next(last_good: str, section: str) -> str:
    """The end of a divergence message: where the good state is, and the key to change."""
    if not last_good:
        return f"no checkpoint was saved before it. Lower {section}.learning_rate (or lengthen the warmup) and start again"
    return f"last good checkpoint: {last_good}. Lower {section}.learning_rate (or lengthen the warmup) and resume from it"


@dataclass
class SpikeGuard:
    """Rolling loss and grad-norm statistics; a step past mean + sigma·std of either is a spike."""
    sigma: float  # 0: never skip
    window: int = 128
    min_history: int = 20  # no verdict before this many good steps: early training is all "spikes"
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0

    def spike(self, loss: float, grad_norm: float) -> str:
        """Why this step is a spike ("" if it is not)."""
        if self.sigma <= 0 or len(self.losses) < self.min_history:
            return ""
        for name, value, history in (("loss", loss, self.losses), ("grad norm", grad_norm, self.grad_norms)):
            mean, std = statistics.fmean(history), statistics.pstdev(history)
            if value > mean + self.sigma * std:
                return f"{name} {value:.4g} > mean {mean:.4g} + {self.sigma:g} x std {std:.3g}"
        return ""

    def record(self, loss: float, grad_norm: float) -> None:
        """Add a step that was taken (skipped ones stay out of the statistics)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.losses = (self.losses + [loss])[-self.window:]
            self.grad_norms = (self.grad_norms + [grad_norm])[-self.window:]

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "grad_norms": self.grad_norms, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses, self.grad_norms = list(state.get("losses", [])), list(state.get("grad_norms", []))
        self.skipped = int(state.get("skipped", 0))
