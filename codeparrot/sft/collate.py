"""The instruction-tuning collate: the chapter's padding and masking rules, by position, never by value; and packing.

Each record becomes prompt + response tokens. Its example is those tokens as inputs, and the same shifted by one
with an appended EOS as targets: the EOS is a target (so the model learns to stop) and, with mask_prompt, every
position that predicts a prompt token is -100. A padded batch pads inputs with EOS and targets with -100 to the
longest example, which is the chapter's "longest row + 1, then shift". Masking by position matters: pad is EOS,
so masking by value would also mask a real EOS, and user text is encoded so that a literal "<|endoftext|>" stays
text. A packed batch joins several examples into one row, with positions restarting and a document id per
example, so that attention (model.py, documents.py) stays inside each example and the loss equals the unpacked one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

IGNORE = -100
Example = tuple[list[int], list[int]]  # (inputs, targets) of one record, aligned: targets[t] is the target at t


@dataclass
class Batch:
    """Inputs and targets [B, T]; packed rows also carry position and document ids [B, T]."""

    inputs: torch.Tensor
    targets: torch.Tensor
    dropped: int = 0  # rows whose targets were all masked after truncation (dropped and counted)
    position_ids: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None

    @property
    def target_tokens(self) -> int:
        """Supervised positions: what the loss is averaged over (across micro-batches and ranks too)."""
        return int((self.targets != IGNORE).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments (model.batch_inputs reads them)."""
        out = {"input_ids": self.inputs, "targets": self.targets}
        if self.document_ids is not None:
            out.update(position_ids=self.position_ids, document_ids=self.document_ids)
        return out


def make_example(ids: list[int], n_prompt: int, eos_id: int, allowed_max_length: int,
                 mask_prompt: bool = False) -> Example:
    """One record's (inputs, targets) by the chapter's rules, truncated to allowed_max_length."""
    targets = ids[1:] + [eos_id]  # the appended EOS is the last target: the one that teaches stopping
    masked = min(max(n_prompt - 1, 0), len(targets)) if mask_prompt else 0
    targets[:masked] = [IGNORE] * masked  # positions that predict prompt tokens
    return ids[:allowed_max_length], targets[:allowed_max_length]


def has_targets(example: Example) -> bool:
    """Whether truncation left the example anything to learn."""
    return any(t != IGNORE for t in example[1])


def pad_examples(examples: list[Example], eos_id: int, dropped: int = 0) -> Batch:
    """Pad every example to the longest: inputs with EOS, targets with -100."""
    width = max(len(x) for x, _ in examples)
    inputs = torch.tensor([x + [eos_id] * (width - len(x)) for x, _ in examples])  # [B, width]
    targets = torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in examples])
    return Batch(inputs, targets, dropped)


def collate(items: list[tuple[list[int], int]], eos_id: int, allowed_max_length: int,
            mask_prompt: bool = False) -> Batch:
    """A padded batch of (prompt + response ids, prompt length) items (encode_record's), rows without targets
    dropped and counted."""
    examples = [make_example(ids, n, eos_id, allowed_max_length, mask_prompt) for ids, n in items]
    kept = [e for e in examples if has_targets(e)]
    if not kept:
        raise ValueError(f"every row of this batch lost all its targets to allowed_max_length={allowed_max_length}; "
                         "raise it (up to the model's n_positions) or turn mask_prompt off")
    return pad_examples(kept, eos_id, len(examples) - len(kept))


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Group example indices into rows of at most row_length tokens, best fit decreasing (each example, longest
    first, goes to the fullest row it still fits, as TRL's "bfd" packing): rows end up ~95% full where filling
    them in order leaves ~20% empty. Every index appears exactly once; rows list their examples in index order."""
    import bisect

    too_long = [i for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than a row's {row_length}: "
                         "truncate it first")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row) sorted: the first entry >= n is the best fit
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            bisect.insort(room, (row_length - lengths[i], len(rows) - 1))
            continue
        left, row = room.pop(at)
        rows[row].append(i)
        bisect.insort(room, (left - lengths[i], row))
    return [sorted(row) for row in rows]


def collate_packed(rows: list[list[Example]], eos_id: int) -> Batch:
    """A batch of packed rows: examples end to end, positions restarting at each, padded to the longest row.

    Each example has its own document id; the padding after a row's last example is one more document, so no real
    token attends to it. No target crosses from one example to the next: each example's targets are its own.
    """
    width = max(sum(len(x) for x, _ in row) for row in rows)
    inputs, targets, positions, documents = [], [], [], []
    for row in rows:
        x = [t for ex, _ in row for t in ex]
        y = [t for _, ey in row for t in ey]
        pos = [p for ex, _ in row for p in range(len(ex))]
        doc = [d for d, (ex, _) in enumerate(row) for _ in ex]
        pad = width - len(x)
        inputs.append(x + [eos_id] * pad)
        targets.append(y + [IGNORE] * pad)
        positions.append(pos + list(range(pad)))
        documents.append(doc + [len(row)] * pad)
    return Batch(torch.tensor(inputs), torch.tensor(targets), 0, torch.tensor(positions), torch.tensor(documents))
