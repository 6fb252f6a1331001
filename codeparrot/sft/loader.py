"""Fine-tuning's batches: rows (one example each, or several packed) dealt to ranks, epoch after epoch.

Training reshuffles the rows every epoch with a generator seeded by (seed, epoch) and drops the last incomplete
batch; validation and test go in order and keep it. Each batch goes to one rank (batch i to rank i % world), so no
rank reads another's rows. The order is a pure function of (seed, epoch), so the resume state is two integers.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from .collate import Batch, Example, collate_packed, pad_examples

Row = list[Example]  # the examples of one row: one when padded, several when packed


def row_collate(packing: bool, eos_id: int) -> Callable[[list[Row]], Batch]:
    """How a list of rows becomes a batch: padded examples, or packed rows."""
    if packing:
        return lambda rows: collate_packed(rows, eos_id)
    return lambda rows: pad_examples([ex for row in rows for ex in row], eos_id)


class EpochBatches:
    """The training micro-batches of one rank, forever: shuffled per epoch, drop_last, resumable exactly."""

    def __init__(self, rows: list[Row], collate: Callable[[list[Row]], Batch], batch_size: int, rank: int,
                 world_size: int, seed: int, accumulation: int = 1, shuffle: bool = True) -> None:
        self.rows, self.collate, self.batch_size = rows, collate, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        # micro-batches per rank per epoch, a whole number of optimizer steps, so that steps never straddle epochs
        self.per_epoch = len(rows) // (batch_size * world_size) // accumulation * accumulation
        if self.per_epoch == 0:
            raise ValueError(f"{len(rows)} training rows make no full step of batch_size {batch_size} x "
                             f"{world_size} process(es) x accumulation {accumulation}: lower sft.batch_size or "
                             f"add records")
        self.epoch, self.index = 0, 0  # the next micro-batch: index within epoch

    def order(self, epoch: int) -> list[int]:
        """The rows' order in `epoch`: a permutation drawn from (seed, epoch) alone."""
        if not self.shuffle:
            return list(range(len(self.rows)))
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                              ).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order, B = self.order(self.epoch), self.batch_size
            while self.index < self.per_epoch:
                start = (self.index * self.world_size + self.rank) * B
                self.index += 1  # before the yield: a state taken after this batch resumes at the next one
                yield self.collate([self.rows[i] for i in order[start:start + B]]).model_inputs()
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "rows": len(self.rows), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["rows"], state["world_size"]) != (len(self.rows), self.world_size):
            raise ValueError(f"the checkpoint's data state is for {state['rows']} rows on {state['world_size']} "
                             f"process(es); this run has {len(self.rows)} on {self.world_size}")
        self.epoch, self.index = state["epoch"], state["index"]


def ordered_batches(rows: list[Row], collate: Callable[[list[Row]], Batch], batch_size: int, rank: int,
                    world_size: int, limit: int = 0) -> list[dict[str, torch.Tensor]]:
    """This rank's batches of an evaluation split, in order, the last one kept; at most `limit` (0: all)."""
    starts = range(rank * batch_size, len(rows), batch_size * world_size)
    if limit > 0:
        starts = starts[:limit]
    return [collate(rows[s:s + batch_size]).model_inputs() for s in starts]
