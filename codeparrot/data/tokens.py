"""`TokenShardDataset`: the `seq_length` blocks of a pretokenized split, read through memmap.

`tokens/` is written by the `pretokenize` stage (data/pretokenize.py, where its format is described); its names are
re-exported here for the callers that read tokens/.

`TokenShardDataset` treats a split as one stream, the concatenation of its files in `meta.json` order, cut into
`seq_length` blocks: a block may span two files, and only the final partial block of the split is dropped. With
transforms (data/transforms.py), each block's documents get their quality token and their FIM form, each fragment
decoded and cut at characters, as bigcode's Megatron-LM does per sample: see `transform_block`.
"""
from __future__ import annotations

import bisect
import copy
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from codeparrot.data.packing import check_same_consumer, consumer_of
from codeparrot.data.pretokenize import DOCS_DTYPE, META, check_tokenizer, load_meta
from codeparrot.data.transforms import Transforms, transform_block

log = logging.getLogger(__name__)

STATE_VERSION = 1

def block_order(n_blocks: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The global order of a split's blocks in an epoch: a permutation seeded by (seed, epoch), or identity."""
    order = np.arange(n_blocks, dtype=np.int32 if n_blocks < 2 ** 31 else np.int64)  # int32 halves the memory
    if shuffle:
        np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).shuffle(order)
    return order


class TokenShardDataset(IterableDataset):
    """`seq_length` token blocks (LongTensor [seq_length]) from the pretokenized shards of one split.

    The split is one stream of ids (its files concatenated in `meta.json` order) cut into N = tokens // seq_length
    blocks; a block may span a file boundary, and only the final partial block of the split is left out. Each
    epoch orders the N blocks by `block_order(N, seed, epoch, shuffle)`; consumer c = rank * num_workers +
    worker_id of C = world_size * num_workers takes the positions c, c + C, c + 2C, ... of that order, so the
    consumers of an epoch read every block exactly once between them. Finite mode stops after one epoch;
    infinite mode goes on with epoch 1, 2, ... (a new order each). Blocks are read with memmap slices. With
    `transforms`, block b of epoch e becomes `transform_block` of it, keyed by (seed, e, b, fragment); quality
    tokens need the `.docs` index beside each `.bin` (pretokenize format 2). With `document_mask`,
    make_dataloader's batches name each token's document (packing.DocumentBlocks), as the streaming path's do.

    The state is tiny (epoch and position in this consumer's share), so `StatefulDataLoader` resumes exactly.
    """

    def __init__(self, directory: str | Path, split: str, seq_length: int, infinite: bool = False,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 tokenizer_fingerprint: str | None = None, transforms: Transforms | None = None,
                 document_mask: bool = False):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.directory = Path(directory)
        meta = load_meta(self.directory)
        if tokenizer_fingerprint is not None:
            check_tokenizer(self.directory, tokenizer_fingerprint, meta)
        if split not in meta["splits"]:
            raise ValueError(f"{self.directory / META} has no split {split!r}; it has {sorted(meta['splits'])}")
        self.split = split
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        files = meta["splits"][split]["files"]
        self.paths = [self.directory / f["path"] for f in files]
        sizes = [int(f["tokens"]) for f in files]
        for path, n in zip(self.paths, sizes):  # a truncated file would silently shift every later block
            if not path.is_file() or path.stat().st_size != n * self.dtype.itemsize:
                raise ValueError(f"{path} is missing or does not hold the {n} tokens {META} lists; "
                                 f"rerun `codeparrot pretokenize`")
        self.starts = [0]  # global offset of each file's first token, and the total at the end
        for n in sizes:
            self.starts.append(self.starts[-1] + n)
        self.total_tokens = self.starts[-1]
        self.seq_length = seq_length
        self.n_blocks = self.total_tokens // seq_length
        self.infinite = infinite
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.eos_token_id = int(meta["eos_token_id"])
        self.document_mask = document_mask  # read by make_dataloader: the blocks themselves never change
        self.transforms = transforms if transforms is not None and transforms.active else None
        self.docs_paths = self._docs_paths(files) if self.transforms and self.transforms.quality_tokens else []
        self.epoch = 0
        self._position = 0  # blocks of this consumer's share of `epoch` already yielded
        self._iterating = False
        self._pending: dict[str, Any] | None = None  # loaded state, applied when iteration starts
        self._maps: dict[int, np.memmap] = {}  # opened lazily in the process that reads
        self._docs: dict[int, np.memmap] = {}  # the .docs index of file i, likewise
        self._mine: tuple[tuple[int, int, int], np.ndarray] | None = None  # ((epoch, c, C), share)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # memmaps pickle as copies; workers open their own
        state["_maps"], state["_docs"], state["_mine"] = {}, {}, None
        return state

    # --- sharding -------------------------------------------------------------------------------

    def consumer(self) -> tuple[int, int]:
        """(c, C): this process's consumer index and the number of consumers, from rank and worker."""
        return consumer_of(self.rank, self.world_size)

    def share(self, epoch: int, consumer: int, num_consumers: int) -> np.ndarray:
        """The block indices `consumer` reads in `epoch`, in order."""
        key = (epoch, consumer, num_consumers)
        if self._mine is None or self._mine[0] != key:
            # Copy the slice so the full order (N ints) is freed; only this consumer's N / C stay.
            self._mine = key, block_order(self.n_blocks, self.seed, epoch, self.shuffle)[consumer::num_consumers].copy()
        return self._mine[1]

    # --- reading --------------------------------------------------------------------------------

    def _docs_paths(self, files: list[dict[str, Any]]) -> list[Path]:
        """Each file's `.docs` index, checked to hold one record per document (quality tokens read them)."""
        paths = []
        for f, path in zip(files, self.paths):
            docs = self.directory / f["docs"] if "docs" in f else path.with_suffix(".docs")
            if not docs.is_file() or docs.stat().st_size != int(f["documents"]) * DOCS_DTYPE.itemsize:
                raise ValueError(f"data.quality_tokens needs each document's quality bucket, but {docs} is missing or "
                                 f"does not hold the {f['documents']} documents {META} lists; rerun "
                                 f"`codeparrot pretokenize` (it writes a .docs index beside each .bin)")
            paths.append(docs)
        return paths

    def _doc_map(self, i: int) -> np.memmap:
        mm = self._docs.get(i)
        if mm is None:
            mm = self._docs[i] = np.memmap(self.docs_paths[i], dtype=DOCS_DTYPE, mode="r")
        return mm

    def doc_starts(self, lo: int, hi: int) -> dict[int, int]:
        """{position - lo: bucket index} of the documents that start within tokens [lo, hi) of the split."""
        out: dict[int, int] = {}
        i = bisect.bisect_right(self.starts, lo) - 1
        while i < len(self.paths) and self.starts[i] < hi:
            if self.starts[i + 1] > self.starts[i]:  # an empty file has no documents (and cannot be mapped)
                docs, base = self._doc_map(i), self.starts[i]
                bounds = np.array([max(lo - base, 0), hi - base], dtype=np.uint64)
                a, b = np.searchsorted(docs["start"], bounds)  # a binary search: few pages of the memmap
                for start, bucket in zip(docs["start"][a:b].tolist(), docs["quality"][a:b].tolist()):
                    out[base + start - lo] = bucket
            i += 1
        return out

    def _map(self, i: int) -> np.memmap:
        mm = self._maps.get(i)
        if mm is None:
            mm = self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
        return mm

    def read_block(self, block: int) -> torch.Tensor:
        """Block `block` of the split as a LongTensor [seq_length]: one memmap slice, or two across a file end."""
        seq = self.seq_length
        lo = block * seq
        i = bisect.bisect_right(self.starts, lo) - 1
        off = lo - self.starts[i]
        if lo + seq <= self.starts[i + 1]:
            return torch.from_numpy(self._map(i)[off:off + seq].astype(np.int64))
        out = np.empty(seq, dtype=np.int64)
        filled = 0
        while filled < seq:  # the block runs over into the next file(s)
            if self.starts[i + 1] > self.starts[i]:  # an empty file (all its records were bad) cannot be mapped
                piece = self._map(i)[off:off + seq - filled]
                out[filled:filled + len(piece)] = piece
                filled += len(piece)
            i, off = i + 1, 0
        return torch.from_numpy(out)

    def sample(self, block: int, epoch: int) -> torch.Tensor:
        """Block `block` as trained on in `epoch` (LongTensor [seq_length]): read_block, then the transforms."""
        ids = self.read_block(block)
        if self.transforms is None:
            return ids
        lo = block * self.seq_length
        starts = self.doc_starts(lo, lo + self.seq_length) if self.transforms.quality_tokens else {}
        out = transform_block(ids.tolist(), self.eos_token_id, starts, self.transforms, (self.seed, epoch, block))
        return torch.tensor(out, dtype=torch.long)

    # --- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        consumer, num_consumers = self.consumer()
        start = self._pending or self._initial_state(consumer, num_consumers)
        self._pending = None
        self._check_geometry(start, consumer, num_consumers)
        self.epoch, self._position = start["epoch"], start["position"]
        self._iterating = True
        return self._generate(consumer, num_consumers)

    def _generate(self, consumer: int, num_consumers: int) -> Iterator[torch.Tensor]:
        while True:
            mine = self.share(self.epoch, consumer, num_consumers)
            while self._position < len(mine):
                block = int(mine[self._position])
                self._position += 1  # counted before yielding: state_dict() is read while we are suspended
                yield self.sample(block, self.epoch)
            if not self.infinite:
                return
            if len(mine) == 0:
                log.warning("consumer %d of %d has no blocks of %s (%d blocks); stopping its infinite stream",
                            consumer, num_consumers, self.split, self.n_blocks)
                return
            self.epoch, self._position = self.epoch + 1, 0

    # --- state ----------------------------------------------------------------------------------

    def _initial_state(self, consumer: int, num_consumers: int) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "token_shards", "consumer": consumer,
                "num_consumers": num_consumers, "seq_length": self.seq_length, "total_tokens": self.total_tokens,
                "shuffle": self.shuffle, "seed": self.seed, "epoch": 0, "position": 0}

    def _check_geometry(self, state: dict[str, Any], consumer: int, num_consumers: int) -> None:
        """Refuse a state saved by another consumer, for other shards, another block length or order."""
        if state.get("kind") != "token_shards" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a TokenShardDataset state (version {STATE_VERSION}): "
                             f"kind {state.get('kind')!r}, version {state.get('version')!r}")
        check_same_consumer(state, consumer, num_consumers)
        saved = (state["seq_length"], state["total_tokens"], state["shuffle"], state["seed"])
        here = (self.seq_length, self.total_tokens, self.shuffle, self.seed)
        if saved != here:
            raise ValueError(
                f"data state geometry mismatch: it was saved for (seq_length, total_tokens, shuffle, seed) = "
                f"{saved}, this dataset has {here}")

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position in this consumer's share (plus the geometry, checked on load)."""
        if self._pending is not None:
            return copy.deepcopy(self._pending)
        state = self._initial_state(*self.consumer())
        if self._iterating:
            state.update(epoch=self.epoch, position=self._position)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` when iteration next starts (also valid before the first `__iter__`)."""
        self._check_geometry(state, *self.consumer())
        self._pending = copy.deepcopy(state)
        self.epoch = state["epoch"]
