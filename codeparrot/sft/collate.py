"""The instruction-tuning collate: the chapter's padding and masking rules, by position, never by value.

Each record becomes prompt + response tokens. A batch appends EOS to every row and pads with EOS to its longest row
+ 1; the targets are the inputs shifted by one: the row's first EOS is a target (so the model learns to stop),
every position after it is -100 and, with
mask_prompt, at every position that predicts a prompt token. Masking by position matters: pad is EOS, so masking by
value would also mask a real EOS, and user text is encoded so that a literal "<|endoftext|>" stays text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


IGNORE = -100


@dataclass
class Batch:
    """Inputs and targets [B, T]; rows whose targets were all masked after truncation are dropped and counted."""

    inputs: torch.Tensor
    targets: torch.Tensor
    dropped: int

    @property
    def target_tokens(self) -> int:
        """Supervised positions: what the loss is averaged over (across micro-batches and ranks too)."""
        return int((self.targets != IGNORE).sum())


def collate(items: list[tuple[list[int], int]], eos_id: int, allowed_max_length: int,
            mask_prompt: bool = False) -> Batch:
    """Append EOS, pad with EOS to the longest row + 1, shift, mask by position, truncate (encode_record's items)."""
    width = max(len(ids) for ids, _ in items) + 1
    inputs, targets, dropped = [], [], 0
    for ids, n_prompt in items:
        padded = ids + [eos_id] * (width - len(ids))  # [width]: at least one EOS
        x = torch.tensor(padded[:-1])  # [width - 1]
        y = torch.tensor(padded[1:])
        y[len(ids):] = IGNORE  # y[len(ids) - 1] is the row's EOS: kept; the padding after it is not learned
        if mask_prompt:
            y[:n_prompt - 1] = IGNORE  # positions that predict prompt tokens
        x, y = x[:allowed_max_length], y[:allowed_max_length]
        if bool((y == IGNORE).all()):
            dropped += 1  # truncation left it nothing to learn
            continue
        inputs.append(x)
        targets.append(y)
    if not inputs:
        raise ValueError(f"every row of this batch lost all its targets to allowed_max_length={allowed_max_length}; "
                         "raise it (up to the model's n_positions) or turn mask_prompt off")
    return Batch(torch.stack(inputs), torch.stack(targets), dropped)
