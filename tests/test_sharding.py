"""Two real CPU processes x two DataLoader workers: one finite epoch covers every document exactly once.

The corpus is real standard-library files, each prefixed with a unique `# marker-XXXXX` line; the tokenizer
holds each marker as one added token, so a marker id is in exactly one block. Every document is longer than a
block, so the only tokens a consumer may leave out (its final partial block, or the split's for token shards)
never hold a marker: the check below is exact, every marker once, and fails on a duplicate or a gap. With the
transforms on (quality tokens, FIM at 0.5), each consumer's blocks must be exactly its share transformed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from codeparrot.config import load_config
from codeparrot.corpus.quality import QUALITY_BUCKETS, UNKNOWN_QUALITY
from codeparrot.corpus.source import ShardWriter, list_shards
from codeparrot.data.pretokenize import load_meta, run_pretokenize
from codeparrot.data.tokens import TokenShardDataset, block_order
from codeparrot.data.transforms import SpecialIds, Transforms, document_key, untransform
from codeparrot.tokenizer import save_tokenizer, train_on

from conftest import SUBPROCESS_ENV, free_port, read_tokens

EOS = "<|endoftext|>"
SEQ = 32
N_DOCS = 60
PER_SHARD = 10  # 6 train shards for 4 consumers: whole files, unevenly (2, 2, 1, 1)
SCRIPT = Path(__file__).with_name("sharding_worker.py")
ENV = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}


def _bucket(i: int) -> int:
    return i % 4 if i % 4 < len(QUALITY_BUCKETS) else UNKNOWN_QUALITY  # every fourth document has none


def _record(i: int, content: str) -> dict:
    record = {"repo_name": "stdlib/marked", "path": f"m{i}.py", "copies": "1", "size": str(len(content)),
              "content": content, "license": "psf-2.0"}
    if _bucket(i) != UNKNOWN_QUALITY:
        record["quality"] = QUALITY_BUCKETS[_bucket(i)]
    return record


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """clean/{train,valid} of marked stdlib files, a tokenizer with one id per marker, and its tokens/."""
    texts: list[str] = []
    for f in sorted(Path(os.__file__).parent.rglob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 400 <= len(text) <= 2500 and text not in texts:
            texts.append(text)
        if len(texts) == N_DOCS + 2:
            break
    assert len(texts) == N_DOCS + 2
    markers = [f"marker-{i:05d}" for i in range(N_DOCS)]
    docs = [f"# {m}\n{t}" for m, t in zip(markers, texts)]
    work = tmp_path_factory.mktemp("sharding")
    with ShardWriter(work / "clean" / "train", PER_SHARD) as w:
        for i, d in enumerate(docs):
            w.write(_record(i, d))
    with ShardWriter(work / "clean" / "valid", PER_SHARD) as w:
        for i, t in enumerate(texts[N_DOCS:]):
            w.write(_record(N_DOCS + i, t))
    tok = train_on(iter([texts]), vocab_size=500, min_frequency=2, eos_token=EOS)
    tok.add_tokens(markers)
    (work / "tokenizer").mkdir()
    save_tokenizer(tok, work / "tokenizer", EOS)
    cfg = load_config(None, [f"paths.workdir={work}", "data.pretokenize_num_proc=2"])
    run_pretokenize(cfg)
    marker_ids = {tok.token_to_id(m): m for m in markers}
    eos = tok.token_to_id(EOS)
    lengths = [len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False)]
    assert min(lengths) > SEQ  # so no marker can sit in a dropped final partial block
    fim = Transforms(SpecialIds.from_tokenizer(tok), quality_tokens=True, fim_rate=0.5, fim_spm_rate=0.5)
    return {"work": work, "tok": tok, "docs": docs, "markers": markers, "marker_ids": marker_ids, "eos": eos,
            "fim": fim}


@pytest.fixture(scope="module")
def reports(corpus, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharding-out")
    work = corpus["work"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(SCRIPT),
           str(out), str(work / "clean" / "train"), str(work / "tokens"), str(work / "tokenizer" / "tokenizer.json"),
           str(SEQ)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _by_consumer(reports: list[dict], path: str) -> dict[int, list[list[int]]]:
    out: dict[int, list[list[int]]] = {}
    for rep in reports:
        for c, blocks in rep[path].items():
            assert int(c) // 2 == rep["rank"]  # consumer c = rank * num_workers + worker_id
            out[int(c)] = blocks
    return out


def _markers_seen(by_consumer: dict[int, list[list[int]]], marker_ids: dict[int, str]) -> Counter:
    return Counter(marker_ids[t] for blocks in by_consumer.values() for b in blocks for t in b if t in marker_ids)


@pytest.mark.slow
def test_world_of_two_processes(reports):
    assert [(r["rank"], r["world_size"], r["dist_world_size"]) for r in reports] == [(0, 2, 2), (1, 2, 2)]


def test_streaming_epoch_covers_every_document_exactly_once(reports, corpus):
    by_consumer = _by_consumer(reports, "streaming")
    assert sorted(by_consumer) == [0, 1, 2, 3] and all(by_consumer.values())
    assert all(len(b) == SEQ for blocks in by_consumer.values() for b in blocks)
    seen = _markers_seen(by_consumer, corpus["marker_ids"])
    assert seen == Counter(corpus["markers"])  # every marker exactly once: no duplicate, no gap

    # Each consumer read whole files, files[c::4], and delivered its own stream in order.
    tok, eos = corpus["tok"], corpus["eos"]
    files = list_shards(corpus["work"] / "clean" / "train")
    assert len(files) == 6
    for c, blocks in by_consumer.items():
        docs = [d for i, d in enumerate(corpus["docs"]) if (i // PER_SHARD) % 4 == c]
        stream = [t for e in tok.encode_batch(docs, add_special_tokens=False) for t in e.ids + [eos]]
        assert [t for b in blocks for t in b] == stream[: len(stream) // SEQ * SEQ], c


def test_token_shard_epoch_covers_every_block_exactly_once(reports, corpus):
    by_consumer = _by_consumer(reports, "tokens")
    assert sorted(by_consumer) == [0, 1, 2, 3] and all(by_consumer.values())
    seen = _markers_seen(by_consumer, corpus["marker_ids"])
    assert seen == Counter(corpus["markers"])  # every marker exactly once: no duplicate, no gap

    # Exactly the split's blocks, consumer c taking positions c, c+4, ... of the (seed, epoch) order.
    ids = read_tokens(corpus["work"] / "tokens", "train").astype(np.int64)
    n_blocks = len(ids) // SEQ
    assert load_meta(corpus["work"] / "tokens")["splits"]["train"]["documents"] == N_DOCS
    order = block_order(n_blocks, seed=3, epoch=0, shuffle=True)
    for c, blocks in by_consumer.items():
        assert blocks == [ids[b * SEQ:(b + 1) * SEQ].tolist() for b in order[c::4]], c
    assert sum(len(b) for b in by_consumer.values()) == n_blocks


def test_transformed_streaming_epoch_is_each_consumers_share_transformed(reports, corpus):
    by_consumer = _by_consumer(reports, "streaming_fim")
    assert sorted(by_consumer) == [0, 1, 2, 3]
    tok, eos, fim = corpus["tok"], corpus["eos"], corpus["fim"]
    restored: list[str] = []
    for c, blocks in by_consumer.items():
        stream: list[int] = []  # document i is line i % PER_SHARD of file i // PER_SHARD; consumer c reads files[c::4]
        for i, doc in enumerate(corpus["docs"]):
            if (i // PER_SHARD) % 4 == c:
                cut = fim.cut(document_key(0, 0, i // PER_SHARD, i % PER_SHARD), len(doc))
                pieces = [tok.encode(p, add_special_tokens=False).ids for p in fim.pieces(doc, cut)]
                stream += fim.assemble(pieces, cut, _bucket(i)) + [eos]
        got = [t for b in blocks for t in b]
        assert got == stream[: len(stream) // SEQ * SEQ], c
        documents = " ".join(map(str, got)).split(f" {eos} ")[:-1]  # the last one may be cut with the final block
        restored += [tok.decode(untransform([int(x) for x in d.split()], fim.ids)[1]) for d in documents]
    # Every document at most once (whole, back from its FIM form), and only each consumer's last one may be cut.
    assert len(set(restored)) == len(restored) >= len(corpus["docs"]) - 4 and set(restored) <= set(corpus["docs"])
    n_fim = sum(b.count(fim.ids.middle) for blocks in by_consumer.values() for b in blocks)
    assert 15 <= n_fim <= 45  # rate 0.5 of 60 documents


def test_transformed_token_shard_epoch_is_each_consumers_share_transformed(reports, corpus):
    by_consumer = _by_consumer(reports, "tokens_fim")
    fim = corpus["fim"]
    alone = TokenShardDataset(corpus["work"] / "tokens", "train", SEQ, shuffle=True, seed=3, transforms=fim)
    order = block_order(alone.n_blocks, seed=3, epoch=0, shuffle=True)
    for c, blocks in by_consumer.items():  # the blocks of one process, transformed by (seed, epoch, block) alone
        assert blocks == [alone.sample(int(b), 0).tolist() for b in order[c::4]], c
    assert sum(len(b) for b in by_consumer.values()) == alone.n_blocks
    flat = [t for blocks in by_consumer.values() for b in blocks for t in b]
    assert flat.count(fim.ids.middle) > 10 and sum(flat.count(q) for q in fim.ids.quality) > 10
