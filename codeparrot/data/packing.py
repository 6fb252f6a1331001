"""Pack streamed documents into constant-length token blocks, sharded by (rank, worker), resumable exactly."""
from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import tokenizers
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from codeparrot.corpus.source import BadRecords, iter_shard
from codeparrot.data.transforms import Transforms, bucket_index, document_key
from codeparrot.documents import eos_documents
from codeparrot.procs import worker_init_fn

log = logging.getLogger(__name__)
# torchdata 0.11 calls torch.set_vital, which torch >= 2.10 deprecates; harmless, and it fires per loader.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

STATE_VERSION = 1


@dataclass
class _Cursor:
    """Where the next unread document of this consumer is."""

    epoch: int = 0
    file_index: int = 0  # into this consumer's file list
    line: int = 0  # line of that file to resume at
    record_index: int = 0  # global index of the next good record in this epoch (for record striding)


class Document(NamedTuple):
    """One record read for packing, with what names it for the transforms: (epoch, file, line)."""

    text: str
    quality: int  # index into QUALITY_BUCKETS, or UNKNOWN_QUALITY (data/transforms.py)
    epoch: int
    file: int  # index of its file in the dataset's `files` (not in a consumer's share: the same on every consumer)
    line: int


def consumer_of(rank: int, world_size: int) -> tuple[int, int]:
    """(c, C) for the calling process: c = rank * num_workers + worker_id of C = world_size * num_workers."""
    info = get_worker_info()
    num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
    return rank * num_workers + worker_id, world_size * num_workers


def check_same_consumer(state: dict[str, Any], consumer: int, num_consumers: int) -> None:
    """Refuse a data state saved by another consumer: resuming needs the same world size and worker count."""
    if (state["consumer"], state["num_consumers"]) != (consumer, num_consumers):
        raise ValueError(
            f"data state geometry mismatch: it was saved by consumer {state['consumer']} of "
            f"{state['num_consumers']} (rank * num_workers + worker_id of world_size * num_workers), but this "
            f"is consumer {consumer} of {num_consumers}; resume with the same world_size and num_workers")


def _permutation(n: int, key: str) -> list[int]:
    """A permutation of range(n) seeded by `key`."""
    # A stable digest rather than hash(), so the permutation is the same in every process and version.
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))
    return torch.randperm(n, generator=g).tolist()


class ConstantLengthDataset(IterableDataset):
    """Streams documents from JSON-lines shards and yields `seq_length` token blocks (LongTensor).

    Documents are joined with EOS and tokenized a buffer (~num_of_sequences blocks) at a time; the
    tokens that do not fill a block are carried into the next buffer, so no token is lost between
    buffers or (in infinite mode) between epochs. At the end of a finite epoch the final partial
    block is dropped. With `shuffle`, the blocks of each buffer are permuted deterministically. With `transforms`
    (data/transforms.py), each document gets its quality token and, at `fim_rate`, its FIM form, cut at character
    level and drawn from (seed, epoch, file index, line). `only_quality` keeps the documents of one bucket, and
    `condition_on` gives every document that bucket's token instead of its own (for evaluation). With
    `document_mask`, make_dataloader's batches name each token's document (DocumentBlocks).

    Each consumer c = rank * num_workers + worker_id of C = world_size * num_workers reads whole files
    `files[c::C]` when there are at least C files, else every C-th record of all files. One dataset
    object supports one active iteration at a time (as a DataLoader uses it).
    """

    def __init__(self, files: list[Path], tokenizer: tokenizers.Tokenizer, seq_length: int, eos_token_id: int,
                 chars_per_token: float = 3.6, num_of_sequences: int = 256, infinite: bool = False,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 max_bad_ratio: float = 1.0, transforms: Transforms | None = None,
                 only_quality: int | None = None, condition_on: int | None = None, document_mask: bool = False):
        if not files:
            raise ValueError("ConstantLengthDataset needs at least one shard file")
        if seq_length < 1 or num_of_sequences < 1:
            raise ValueError(f"seq_length ({seq_length}) and num_of_sequences ({num_of_sequences}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.eos_token_id = eos_token_id
        self.max_buffer_size = int(seq_length * chars_per_token * num_of_sequences)  # in characters
        self.infinite = infinite
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_bad_ratio = max_bad_ratio
        self.transforms = transforms if transforms is not None and transforms.active else None
        # The conditioning measurement (eval.quality_bucket / eval.quality_token): only one bucket's documents, and
        # every document's quality token replaced by `condition_on`'s.
        self.only_quality, self.condition_on = only_quality, condition_on
        self.document_mask = document_mask  # read by make_dataloader: the blocks themselves never change
        self.epoch = 0
        self.bad = BadRecords(max_ratio=max_bad_ratio)  # counts of the current (or last) iteration
        self._pending: dict[str, Any] | None = None  # loaded state, applied when iteration starts
        self._start: dict[str, Any] | None = None  # state at the start of the current buffer
        self._yielded = 0  # blocks of the current buffer already yielded
        self._logged_striding = False

    # --- sharding -------------------------------------------------------------------------------

    def consumer(self) -> tuple[int, int]:
        """(c, C): this process's consumer index and the number of consumers, from rank and worker."""
        return consumer_of(self.rank, self.world_size)

    def _plan(self, consumer: int, num_consumers: int, epoch: int = 0) -> tuple[list[int], bool]:
        """The files (indices into `files`) this consumer reads in `epoch`, in order, and whether it strides over
        records instead.

        With `shuffle`, each epoch first permutes the whole file list by (seed, epoch), the same on every consumer,
        then deals it out: every file is still read by one consumer, files move between ranks from epoch to epoch,
        and the plan is a function of the epoch alone, so a resume is exact.
        """
        files = list(range(len(self.files)))
        if self.shuffle:
            files = _permutation(len(files), f"files/{self.seed}/{epoch}")
        if len(files) < num_consumers:
            return files, True
        return files[consumer::num_consumers], False

    def _read(self, cursor: _Cursor, consumer: int, num_consumers: int, bad: BadRecords,
              infinite: bool) -> Iterator[Document]:
        """Yield this consumer's documents from `cursor` on, advancing it past each one before yielding."""
        while True:
            files, striding = self._plan(consumer, num_consumers, cursor.epoch)
            full_pass = cursor.file_index == 0 and cursor.line == 0
            got_any = False
            while cursor.file_index < len(files):
                file = files[cursor.file_index]
                for line_no, record in iter_shard(self.files[file], bad, start_line=cursor.line):
                    index = cursor.record_index
                    cursor.line, cursor.record_index = line_no + 1, index + 1
                    if striding and index % num_consumers != consumer:
                        continue
                    got_any = True
                    quality = bucket_index(record.get("quality"))
                    if self.only_quality is not None and quality != self.only_quality:
                        continue  # after the cursor moved and the striding chose: the shares stay those of all
                    yield Document(record["content"], quality if self.condition_on is None else self.condition_on,
                                   cursor.epoch, file, line_no)
                cursor.file_index, cursor.line = cursor.file_index + 1, 0
            if not infinite:
                return
            if full_pass and not got_any:
                # Without this an empty share would spin forever looking for documents.
                log.warning("consumer %d of %d has no documents; stopping its infinite stream",
                            consumer, num_consumers)
                return
            cursor.epoch, cursor.file_index, cursor.line, cursor.record_index = cursor.epoch + 1, 0, 0, 0
            self.epoch = cursor.epoch

    # --- iteration ------------------------------------------------------------------------------

    def _fill(self, docs: Iterator[Document]) -> list[Document]:
        """The next buffer's documents: until about max_buffer_size characters (empty at the end)."""
        buffer, n_chars = [], 0
        for doc in docs:  # breaking out of a for loop leaves the generator open for the next buffer
            buffer.append(doc)
            n_chars += len(doc.text)
            if n_chars >= self.max_buffer_size:
                break
        return buffer

    def _encode(self, docs: list[Document]) -> list[int]:
        """A buffer's token ids: each document, transformed when transforms are on, followed by EOS."""
        t = self.transforms
        if t is None:
            texts, cuts = [d.text for d in docs], [None] * len(docs)
        else:
            cuts = [t.cut(document_key(self.seed, d.epoch, d.file, d.line), len(d.text)) for d in docs]
            texts = [piece for d, cut in zip(docs, cuts) for piece in t.pieces(d.text, cut)]
        # One batch call for every piece of the buffer; encode_batch_fast skips the offsets we do not use.
        encoded = iter(self.tokenizer.encode_batch_fast(texts, add_special_tokens=False))
        ids: list[int] = []
        for doc, cut in zip(docs, cuts):
            if t is None:
                ids.extend(next(encoded).ids)
            else:
                ids.extend(t.assemble([next(encoded).ids for _ in range(1 if cut is None else 3)], cut, doc.quality))
            ids.append(self.eos_token_id)
        return ids

    def _order(self, n_blocks: int, epoch: int, consumer: int, buffer_index: int) -> list[int]:
        """The order in which a buffer's blocks are yielded: a permutation seeded only by its position."""
        if not self.shuffle:
            return list(range(n_blocks))
        return _permutation(n_blocks, f"{self.seed}/{epoch}/{consumer}/{buffer_index}")

    def __iter__(self) -> Iterator[torch.Tensor]:
        consumer, num_consumers = self.consumer()
        if self._plan(consumer, num_consumers)[1] and not self._logged_striding:
            log.info("%d files for %d consumers (world_size x num_workers): every consumer reads all files "
                     "and keeps every %d-th record", len(self.files), num_consumers, num_consumers)
            self._logged_striding = True
        start = self._pending or self._initial_state(consumer, num_consumers)
        self._pending = None
        self._check_geometry(start, consumer, num_consumers)
        self._start, self._yielded = start, start["yielded"]
        return self._generate(start, consumer, num_consumers)

    def _generate(self, start: dict[str, Any], consumer: int, num_consumers: int) -> Iterator[torch.Tensor]:
        """Fill, tokenize and cut buffers from `start` on, keeping `_start`/`_yielded` current for state_dict()."""
        bad = start["bad"]
        self.bad = BadRecords(max_ratio=self.max_bad_ratio, good=bad["good"], counts=dict(bad["counts"]))
        cursor = _Cursor(start["epoch"], start["file_index"], start["line"], start["record_index"])
        self.epoch = cursor.epoch
        tail, buffer_index, skip = list(start["tail"]), start["buffer_index"], start["yielded"]
        docs = self._read(cursor, consumer, num_consumers, self.bad, self.infinite)
        seq = self.seq_length
        while True:
            # The state names the buffer's start, so a resume re-reads only this one buffer.
            self._start = {**start, **asdict(cursor), "tail": tail, "buffer_index": buffer_index,
                           "bad": {"good": self.bad.good, "counts": dict(self.bad.counts)}}
            self._yielded = skip
            buffer_epoch = cursor.epoch
            buffer = self._fill(docs)
            if not buffer:
                break  # end of a finite epoch: the partial block left in `tail` is dropped
            ids = list(tail) + self._encode(buffer)
            n_blocks = len(ids) // seq
            blocks = torch.tensor(ids[: n_blocks * seq], dtype=torch.long).view(n_blocks, seq)
            tail = ids[n_blocks * seq:]  # carried into the next buffer, never dropped mid-stream
            order = self._order(n_blocks, buffer_epoch, consumer, buffer_index)
            for k in range(skip, n_blocks):
                self._yielded = k + 1  # counted before yielding: state_dict() is read while we are suspended
                yield blocks[order[k]]
            skip = 0
            buffer_index += 1
        self.bad.check(final=True)

    # --- state ----------------------------------------------------------------------------------

    def _initial_state(self, consumer: int, num_consumers: int) -> dict[str, Any]:
        return {"version": STATE_VERSION, "consumer": consumer, "num_consumers": num_consumers,
                "num_files": len(self.files), "seq_length": self.seq_length, **asdict(_Cursor()),
                "tail": [], "buffer_index": 0, "yielded": 0, "bad": {"good": 0, "counts": {}}}

    def _check_geometry(self, state: dict[str, Any], consumer: int, num_consumers: int) -> None:
        """Refuse a state saved by another consumer or for other files or block length."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown ConstantLengthDataset state version {state.get('version')!r}")
        check_same_consumer(state, consumer, num_consumers)
        if (state["num_files"], state["seq_length"]) != (len(self.files), self.seq_length):
            raise ValueError(
                f"data state geometry mismatch: it was saved for {state['num_files']} files and seq_length "
                f"{state['seq_length']}, this dataset has {len(self.files)} files and seq_length {self.seq_length}")

    def state_dict(self) -> dict[str, Any]:
        """A small snapshot: start of the current buffer, carried tail (< seq_length ids), blocks yielded."""
        if self._pending is not None:
            return copy.deepcopy(self._pending)
        if self._start is None:
            return self._initial_state(*self.consumer())
        # Shallow copy: `_start` is rebuilt, never mutated, for each buffer, and this runs after every batch.
        return {**self._start, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` when iteration next starts (also valid before the first `__iter__`)."""
        self._check_geometry(state, *self.consumer())
        self._pending = copy.deepcopy(state)
        self.epoch = state["epoch"]


class DocumentBlocks:
    """The collate of data.document_mask: a batch of token blocks as {input_ids, position_ids, document_ids}
    [B, T] (documents.eos_documents: a document ends with its EOS), so that attention stays inside each document
    and positions restart at each. Pretraining's loss is unchanged: model.batch_inputs gives such a dict its
    input_ids as labels, and the EOS still predicts the next document's first token (from its own document only)."""

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id

    def __call__(self, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(blocks)
        position_ids, document_ids = eos_documents(ids, self.eos_token_id)
        return {"input_ids": ids, "position_ids": position_ids, "document_ids": document_ids}


def make_dataloader(dataset: IterableDataset, batch_size: int, num_workers: int,
                    pin_memory: bool = False) -> StatefulDataLoader:
    """A DataLoader giving LongTensor [batch_size, seq_length] batches, with state_dict()/load_state_dict().

    `dataset` is a ConstantLengthDataset or a TokenShardDataset: one that shards itself by (rank, worker) and has
    state_dict()/load_state_dict(). When its `document_mask` is set, batches are DocumentBlocks' dicts instead;
    the blocks, their order and the state are the same either way.
    """
    # StatefulDataLoader snapshots each worker's dataset state in step with the batches the main process consumed.
    kwargs: dict[str, Any] = {}
    if getattr(dataset, "document_mask", False):
        kwargs["collate_fn"] = DocumentBlocks(dataset.eos_token_id)
    if num_workers > 0:
        kwargs["persistent_workers"] = False
    if "in_order" in inspect.signature(StatefulDataLoader.__init__).parameters:
        kwargs["in_order"] = True  # batches round-robin over workers, which a resumed run must reproduce
    # Its own generator: a loader drawing its workers' base seed from the global RNG would shift every later
    # dropout mask, and a resumed run (which builds its loaders at other moments) would diverge.
    return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                              worker_init_fn=worker_init_fn,  # workers die with this process, even on kill -9
                              generator=torch.Generator().manual_seed(0), **kwargs)
