"""Run by tests/test_sharding.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

Each rank reads one finite epoch through a real StatefulDataLoader with 2 worker processes, from the streaming
ConstantLengthDataset and from the TokenShardDataset, each plain and with both transforms on (quality tokens, FIM
at 0.5), and writes `OUT/rank<R>.json`: its world size and, per dataset and consumer (rank * num_workers +
worker_id), the token ids of every block that consumer delivered, in order.

usage: sharding_worker.py OUT CLEAN_TRAIN_DIR TOKENS_DIR TOKENIZER_JSON SEQ_LENGTH
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tokenizers import Tokenizer

from codeparrot.corpus.source import list_shards
from codeparrot.data.packing import ConstantLengthDataset, make_dataloader
from codeparrot.data.tokens import TokenShardDataset
from codeparrot.data.transforms import SpecialIds, Transforms

NUM_WORKERS = 2
EOS = "<|endoftext|>"
FIM_RATE = 0.5


def per_consumer(loader, rank: int) -> dict[int, list[list[int]]]:
    """Blocks by consumer; the loader's own snapshot says which worker produced each batch."""
    out: dict[int, list[list[int]]] = {}
    for batch in loader:
        worker = loader.state_dict()["_snapshot"]["_last_yielded_worker_id"]
        out.setdefault(rank * NUM_WORKERS + worker, []).extend(batch.tolist())
    return out


def main() -> None:
    out, clean_train, tokens, tokenizer_file, seq = sys.argv[1:6]
    seq_length = int(seq)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # what Accelerator() reads
    rank, world = state.process_index, state.num_processes
    assert world == 2, f"expected a world of 2 processes, got {world}"
    assert dist.is_initialized() and dist.get_world_size() == 2 and dist.get_rank() == rank

    tok = Tokenizer.from_file(tokenizer_file)
    fim = Transforms(SpecialIds.from_tokenizer(tok), quality_tokens=True, fim_rate=FIM_RATE, fim_spm_rate=0.5)
    report = {"rank": rank, "world_size": world, "dist_world_size": dist.get_world_size()}
    for suffix, transforms in (("", None), ("_fim", fim)):
        streaming = ConstantLengthDataset(list_shards(clean_train), tok, seq_length, tok.token_to_id(EOS),
                                          num_of_sequences=4, rank=rank, world_size=world, transforms=transforms)
        shards = TokenShardDataset(tokens, "train", seq_length, shuffle=True, seed=3, rank=rank, world_size=world,
                                   transforms=transforms)
        for name, ds in (("streaming", streaming), ("tokens", shards)):
            loader = make_dataloader(ds, batch_size=3, num_workers=NUM_WORKERS)
            report[name + suffix] = per_consumer(loader, rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
