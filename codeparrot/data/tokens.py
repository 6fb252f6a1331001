"""The `pretokenize` stage and `TokenShardDataset`: token ids on disk as flat binary shards, read through memmap.

Format of `tokens/` (a contract, see DESIGN.md):
- `train/*.bin`, `valid/*.bin`: one file per input shard of `clean/<split>/`, flat little-endian token ids
  (`uint16`, or `uint32` when the vocabulary is larger than 65535); every document is followed by EOS.
- `meta.json`: format version, dtype, vocab size, EOS id, the tokenizer's fingerprint, and per split the token and
  document counts, in total and per file, with the files in reading order.
- `manifest.json` (+ `config.yaml`): the stage's identity, so `pipeline` skips it while clean/ and tokenizer/ match.

`TokenShardDataset` treats a split as one stream, the concatenation of its files in `meta.json` order, cut into
`seq_length` blocks: a block may span two files, and only the final partial block of the split is dropped.
"""
from __future__ import annotations

import bisect
import copy
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from codeparrot.artifacts import fingerprint, is_up_to_date, read_manifest, staged_dir, write_manifest
from codeparrot.config import Config, ConfigError
from codeparrot.corpus.source import SHARD_SUFFIXES, BadRecords, iter_shard, list_shards
from codeparrot.data.packing import check_same_consumer, consumer_of
from codeparrot.logs import progress_bar

log = logging.getLogger(__name__)

STAGE = "pretokenize"
META = "meta.json"
FORMAT = "codeparrot-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")
STATE_VERSION = 1
BATCH_CHARS = 1 << 20  # characters handed to encode_batch at once: large enough to amortise the call


class TokenizerMismatch(ConfigError):
    """Token shards made by another tokenizer than the one a run uses (paths.tokens and paths.tokenizer disagree)."""


# --- format helpers -----------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk id type: uint16 up to a vocabulary of 65535 ids, else uint32 (the DESIGN.md contract)."""
    if vocab_size < 1 or vocab_size > 2 ** 32:
        raise ValueError(f"vocab_size {vocab_size} cannot be stored as unsigned token ids")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def load_meta(directory: str | Path) -> dict[str, Any]:
    """`tokens/meta.json`, checked for the format this code reads."""
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `codeparrot pretokenize` first")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown token shard format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def check_tokenizer(directory: str | Path, tokenizer_fingerprint: str, meta: dict[str, Any] | None = None) -> None:
    """Stop when the shards under `directory` were not made by the tokenizer with this fingerprint."""
    meta = meta or load_meta(directory)
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise TokenizerMismatch(
            f"token shards at {directory} were made by tokenizer {meta['tokenizer_fingerprint']}, but this run's "
            f"tokenizer is {tokenizer_fingerprint}; rerun `codeparrot pretokenize` with this tokenizer (or point "
            f"paths.tokens / paths.tokenizer at a matching pair)")


def read_tokens(directory: str | Path, split: str) -> np.ndarray:
    """All token ids of a split, concatenated in reading order (for tests and inspection; loads it all)."""
    meta = load_meta(directory)
    parts = [np.fromfile(Path(directory) / f["path"], dtype=meta["dtype"]) for f in meta["splits"][split]["files"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


# --- the pretokenize stage ----------------------------------------------------------------------

_worker_tokenizer: dict[str, Any] = {}  # per process: tokenizer.json path -> loaded Tokenizer


def _get_tokenizer(path: str):
    from tokenizers import Tokenizer

    if path not in _worker_tokenizer:
        _worker_tokenizer.clear()
        _worker_tokenizer[path] = Tokenizer.from_file(path)
    return _worker_tokenizer[path]


def _pool_init() -> None:
    # Each pool process encodes one shard on one core; tokenizers' own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def tokenize_shard(source: str, dest: str, tokenizer_file: str, eos_id: int, dtype: str,
                   batch_chars: int = BATCH_CHARS) -> dict[str, Any]:
    """Encode every good record of one clean shard into `dest`: ids of each document, then EOS."""
    tok = _get_tokenizer(tokenizer_file)
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use: about 1.3x faster.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    np_dtype = np.dtype(dtype)
    limit = np.iinfo(np_dtype).max
    bad = BadRecords()  # judged over the whole stage by the caller
    n_tokens = n_docs = n_chars = 0

    def flush(texts: list[str], fh) -> None:
        nonlocal n_tokens, n_docs
        ids: list[int] = []
        for enc in encode(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos_id)
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.max() > limit or arr.min() < 0):
            raise ValueError(f"token id {arr.max()} does not fit {dtype}")
        arr.astype(np_dtype).tofile(fh)
        n_tokens += arr.size
        n_docs += len(texts)

    with open(dest, "wb") as fh:
        texts: list[str] = []
        size = 0
        for _, record in iter_shard(source, bad):
            text = record["content"]
            texts.append(text)
            size += len(text)
            n_chars += len(text)
            if size >= batch_chars:
                flush(texts, fh)
                texts, size = [], 0
        if texts:
            flush(texts, fh)
    return {"tokens": n_tokens, "documents": n_docs, "chars": n_chars,
            "bad": {"good": bad.good, "counts": dict(bad.counts)}}


def _bin_name(source: Path, index: int) -> str:
    stem = source.name
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{index:06d}-{stem}.bin"  # the index keeps names unique when shards sit in subdirectories


def run_pretokenize(cfg: Config) -> dict[str, Any]:
    """Encode `clean/{train,valid}` with the trained tokenizer into `tokens/` (one .bin per input shard)."""
    clean, tok_dir, out = cfg.paths.resolve("clean"), cfg.paths.resolve("tokenizer"), cfg.paths.resolve("tokens")
    tokenizer_file = tok_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found; run `codeparrot train-tokenizer` first")
    if not clean.is_dir():
        raise FileNotFoundError(f"{clean} not found; run `codeparrot prepare` first")
    tok_fp = fingerprint(tok_dir)
    config = {"eos_token": cfg.tokenizer.eos_token, "format_version": FORMAT_VERSION}
    inputs = {"clean": fingerprint(clean), "tokenizer": tok_fp}
    if is_up_to_date(out, STAGE, config, inputs):
        log.info("pretokenize: %s is up to date, skipping", out)
        return {"skipped": True, **read_manifest(out)["counts"]}

    tok = _get_tokenizer(str(tokenizer_file))
    eos_id = tok.token_to_id(cfg.tokenizer.eos_token)
    if eos_id is None:
        raise ValueError(f"the tokenizer at {tok_dir} has no {cfg.tokenizer.eos_token!r} token (tokenizer.eos_token)")
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    sources = {split: list_shards(clean / split) if (clean / split).is_dir() else [] for split in SPLITS}
    if not sources["train"]:
        raise FileNotFoundError(f"no shards under {clean / 'train'}; run `codeparrot prepare` first")
    tasks = [(split, i, src) for split in SPLITS for i, src in enumerate(sources[split])]
    num_proc = max(1, min(cfg.data.pretokenize_num_proc or os.cpu_count() or 1, len(tasks)))
    in_bytes = sum(src.stat().st_size for _, _, src in tasks)

    start = time.perf_counter()
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with staged_dir(out) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        args = [(str(src), str(tmp / split / _bin_name(src, i)), str(tokenizer_file), eos_id, dtype.name)
                for split, i, src in tasks]
        bar = progress_bar(total=len(tasks), desc="pretokenize", unit="shard")
        n_tokens = 0
        try:
            if num_proc == 1:  # in-process: encode_batch uses every core through tokenizers' thread pool
                for (split, i, _), a in zip(tasks, args):
                    results[split, i] = tokenize_shard(*a)
                    n_tokens += results[split, i]["tokens"]
                    bar.update(1)
                    bar.set_postfix_str(f"{n_tokens / 1e6:.1f}M tokens")
            else:
                # fork: workers start in milliseconds and inherit the loaded modules (spawn re-imports torch).
                ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else None)
                with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_pool_init) as pool:
                    futures = {pool.submit(tokenize_shard, *a): (split, i) for (split, i, _), a in zip(tasks, args)}
                    try:
                        for fut in as_completed(futures):
                            results[futures[fut]] = fut.result()
                            n_tokens += results[futures[fut]]["tokens"]
                            bar.update(1)
                            bar.set_postfix_str(f"{n_tokens / 1e6:.1f}M tokens")
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)  # don't encode the rest after a failure
                        raise
        finally:
            bar.close()
        seconds = time.perf_counter() - start

        bad = BadRecords(max_ratio=cfg.corpus.max_bad_ratio)
        splits: dict[str, Any] = {}
        for split in SPLITS:
            files = []
            for i, src in enumerate(sources[split]):
                r = results[split, i]
                bad.good += r["bad"]["good"]
                for kind, n in r["bad"]["counts"].items():
                    bad.counts[kind] = bad.counts.get(kind, 0) + n
                files.append({"path": f"{split}/{_bin_name(src, i)}", "source": str(src.relative_to(clean)),
                              "tokens": r["tokens"], "documents": r["documents"]})
            splits[split] = {"tokens": sum(f["tokens"] for f in files),
                             "documents": sum(f["documents"] for f in files), "files": files}
        bad.check(final=True)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size,
                "eos_token": cfg.tokenizer.eos_token, "eos_token_id": eos_id, "tokenizer_fingerprint": tok_fp,
                "splits": splits}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        total_chars = sum(r["chars"] for r in results.values())
        counts = {"dtype": dtype.name, "vocab_size": vocab_size, "tokenizer_fingerprint": tok_fp,
                  **{f"{s}_{k}": splits[s][k] for s in SPLITS for k in ("tokens", "documents")},
                  "files": len(tasks), "num_proc": num_proc, "seconds": round(seconds, 2),
                  "tokens_per_s": round(n_tokens / max(seconds, 1e-9)),
                  "mb_per_s": round(total_chars / 1e6 / max(seconds, 1e-9), 2), "input_mb": round(in_bytes / 1e6, 2),
                  "bad_records": bad.as_dict()}
        write_manifest(tmp, STAGE, config, inputs, counts, time.perf_counter() - start, full_config=cfg)
    log.info("pretokenize: train %d tokens (%d documents), valid %d tokens (%d documents), %s, %d files with %d "
             "processes, %.2f Mtokens/s", splits["train"]["tokens"], splits["train"]["documents"],
             splits["valid"]["tokens"], splits["valid"]["documents"], dtype.name, len(tasks), num_proc,
             counts["tokens_per_s"] / 1e6)
    return {"skipped": False, **counts}


# --- the dataset --------------------------------------------------------------------------------

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
    infinite mode goes on with epoch 1, 2, ... (a new order each). Blocks are read with memmap slices.

    The state is tiny (epoch and position in this consumer's share), so `StatefulDataLoader` resumes exactly.
    """

    def __init__(self, directory: str | Path, split: str, seq_length: int, infinite: bool = False,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 tokenizer_fingerprint: str | None = None):
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
        self.epoch = 0
        self._position = 0  # blocks of this consumer's share of `epoch` already yielded
        self._iterating = False
        self._pending: dict[str, Any] | None = None  # loaded state, applied when iteration starts
        self._maps: dict[int, np.memmap] = {}  # opened lazily in the process that reads
        self._mine: tuple[tuple[int, int, int], np.ndarray] | None = None  # ((epoch, c, C), share)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"], state["_mine"] = {}, None  # memmaps pickle as copies; workers open their own
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
                yield self.read_block(block)
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
