"""One clean shard encoded into a token shard: its `.bin` (ids, EOS after every document) and its `.docs` index.

The worker of `pretokenize` (data/pretokenize.py describes the format), on our own process pool or as a datatrove
task (data/pretokenize_task.py): both import it from here, below the stage, so neither imports the other's module.
It does not import torch: its workers start in a fraction of a second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.quality import QUALITY_BUCKETS, UNKNOWN_QUALITY
from ..corpus.source import BadRecords, iter_shard, utf8_len

DOCS_DTYPE = np.dtype([("start", "<u8"), ("quality", "u1")])
_BUCKET_INDEX = {name: i for i, name in enumerate(QUALITY_BUCKETS)}
BATCH_CHARS = 1 << 20  # characters handed to encode_batch at once: large enough to amortise the call

_worker_tokenizer: dict[str, Any] = {}  # per process: tokenizer.json path -> loaded Tokenizer


def _get_tokenizer(path: str):
    """The tokenizer.json at `path`, as text_encoder, loaded once per process."""
    from tokenizers import Tokenizer

    from ..tokenizer import text_encoder

    if path not in _worker_tokenizer:
        _worker_tokenizer.clear()
        _worker_tokenizer[path] = text_encoder(Tokenizer.from_file(path))
    return _worker_tokenizer[path]


def docs_path(bin_path: str | Path) -> Path:
    """The `.docs` file beside a `.bin`."""
    return Path(bin_path).with_suffix(".docs")


def tokenize_shard(task: tuple[str, str, str, int, str]) -> dict[str, Any]:
    """Encode every good record of one clean shard into `dest`: ids of each document, then EOS; and `dest`'s
    `.docs`: each document's start and quality bucket.

    `task` is (source shard, dest .bin, tokenizer.json, EOS id, dtype name).
    """
    source, dest, tokenizer_file, eos_id, dtype = task
    tok = _get_tokenizer(tokenizer_file)
    np_dtype = np.dtype(dtype)
    limit = np.iinfo(np_dtype).max
    bad = BadRecords()  # judged over the whole stage by the caller
    counts = {"tokens": 0, "documents": 0, "bytes": 0}

    def flush(texts: list[str], buckets: list[int], fh, docs_fh) -> None:
        ids: list[int] = []
        docs = np.empty(len(texts), DOCS_DTYPE)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use: about 1.3x faster.
        for j, enc in enumerate(tok.encode_batch_fast(texts, add_special_tokens=False)):
            docs[j]["start"] = counts["tokens"] + len(ids)
            ids.extend(enc.ids)
            ids.append(eos_id)
        docs["quality"] = buckets
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.max() > limit or arr.min() < 0):
            raise ValueError(f"token id {arr.max()} does not fit {dtype}")
        arr.astype(np_dtype).tofile(fh)
        docs.tofile(docs_fh)
        counts["tokens"] += arr.size
        counts["documents"] += len(texts)

    with open(dest, "wb") as fh, open(docs_path(dest), "wb") as docs_fh:
        texts: list[str] = []
        buckets: list[int] = []
        size = 0
        for _, record in iter_shard(source, bad):
            text = record["content"]
            texts.append(text)
            buckets.append(_BUCKET_INDEX.get(record.get("quality"), UNKNOWN_QUALITY))
            size += len(text)
            counts["bytes"] += utf8_len(text)
            if size >= BATCH_CHARS:
                flush(texts, buckets, fh, docs_fh)
                texts, buckets, size = [], [], 0
        if texts:
            flush(texts, buckets, fh, docs_fh)
    return {**counts, "bad": {"good": bad.good, "counts": dict(bad.counts)}}
