"""`codeparrot train` with a loss made non-finite or spiked on purpose, from optimizer step FROM on, on one rank.

    nan_worker.py KIND RANK FROM [codeparrot train arguments...]    KIND: nan | spike (x50 for one step)

Run as a plain script or under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo); only process RANK sees
it. GPT.forward is wrapped here, in the test's worker, so the library carries no test hook.
"""
from __future__ import annotations

import sys

from codeparrot.cli import main
from codeparrot.model import GPT


def inject(kind: str, rank: int, first_step: int) -> None:
    """Wrap GPT.forward: in training mode on `rank`, from step `first_step` (1-based, 1 micro-batch per step)."""
    import torch.distributed as dist

    forward, calls = GPT.forward, {"train": 0}

    def wrapped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if not self.training or (dist.is_initialized() and dist.get_rank() != rank):
            return out
        calls["train"] += 1
        step = calls["train"]
        if (kind == "nan" and step >= first_step) or (kind == "spike" and step == first_step):
            out = out._replace(loss=out.loss * (float("nan") if kind == "nan" else 50.0))
        return out

    GPT.forward = wrapped


if __name__ == "__main__":
    inject(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(main(["train", *sys.argv[4:]]))
