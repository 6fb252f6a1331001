"""ConstantLengthDataset: packing, sharding by (rank, worker), infinite mode, exact resume, bad records."""
from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import first_batches
from codeparrot.corpus.quality import QUALITY_BUCKETS, UNKNOWN_QUALITY
from codeparrot.corpus.source import ShardWriter, list_shards
from codeparrot.data import packing
from codeparrot.corpus.source import BadRecords
from codeparrot.data.packing import ConstantLengthDataset, _Cursor, make_dataloader
from codeparrot.data.transforms import SpecialIds, Transforms, document_key, untransform
from codeparrot.tokenizer import special_tokens

EOS = "<|endoftext|>"
SEQ = 32

# torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch 2.13 deprecates; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def _record(i: int, content: str) -> dict:
    record = {"repo_name": "stdlib/test", "path": f"f{i}.py", "copies": "1", "size": str(len(content)),
              "content": content, "license": "psf-2.0"}
    if i % 4 < len(QUALITY_BUCKETS):  # every fourth record has no bucket, as a corpus prepared without a signal
        record["quality"] = QUALITY_BUCKETS[i % 4]
    return record


def bucket_of(i: int) -> int:
    """The bucket index `_record(i, ...)` gets."""
    return i % 4 if i % 4 < len(QUALITY_BUCKETS) else UNKNOWN_QUALITY


def _write_shards(directory: Path, docs: list[str], per_shard: int) -> list[Path]:
    with ShardWriter(directory, per_shard) as writer:
        for i, doc in enumerate(docs):
            writer.write(_record(i, doc))
    return list_shards(directory)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """40 small, distinct, real Python files from the standard library, in a fixed order."""
    out: list[str] = []
    for f in sorted(Path(os.__file__).parent.rglob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 300 <= len(text) <= 3000 and text not in out:
            out.append(text)
        if len(out) == 40:
            break
    assert len(out) == 40
    return out


@pytest.fixture(scope="module")
def shards(docs, tmp_path_factory) -> list[Path]:
    return _write_shards(tmp_path_factory.mktemp("corpus"), docs, per_shard=10)  # 4 shards


@pytest.fixture(scope="module")
def tokenizer(docs) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special_tokens(EOS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


@pytest.fixture(scope="module")
def eos(tokenizer) -> int:
    return tokenizer.token_to_id(EOS)


@pytest.fixture(scope="module")
def fim(tokenizer) -> Transforms:
    """Both transforms on, FIM at 0.5 in both orders."""
    return Transforms(SpecialIds.from_tokenizer(tokenizer), quality_tokens=True, fim_rate=0.5, fim_spm_rate=0.5)


def stream(tokenizer: Tokenizer, eos: int, docs: list[str]) -> list[int]:
    """The reference token stream: each document encoded on its own, followed by EOS."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc, add_special_tokens=False).ids + [eos]
    return ids


def blocks_of(ids: list[int], seq: int = SEQ) -> list[tuple[int, ...]]:
    return [tuple(ids[i:i + seq]) for i in range(0, len(ids) - seq + 1, seq)]


def make(shards, tokenizer, eos, **kw) -> ConstantLengthDataset:
    kw.setdefault("num_of_sequences", 4)
    return ConstantLengthDataset(shards, tokenizer, seq_length=SEQ, eos_token_id=eos, **kw)


def flat(blocks) -> list[int]:
    return torch.cat(list(blocks)).tolist() if blocks else []


# --- packing ------------------------------------------------------------------------------------

def test_blocks_have_seq_length_and_eos_between_documents(shards, tokenizer, eos, docs):
    blocks = list(make(shards, tokenizer, eos))
    assert blocks and all(b.shape == (SEQ,) and b.dtype == torch.long for b in blocks)
    segments = " ".join(map(str, flat(blocks))).split(f" {eos} ")  # EOS-separated runs of ids
    complete = segments[:-1]  # the last one may be cut by the dropped final partial block
    assert len(complete) >= len(docs) - 2
    for doc, seg in zip(docs, complete):
        assert tokenizer.decode([int(t) for t in seg.split()]) == doc


def test_no_token_lost_at_buffer_boundaries(shards, tokenizer, eos, docs):
    ds = make(shards, tokenizer, eos, num_of_sequences=2)
    assert sum(map(len, docs)) > 20 * ds.max_buffer_size  # many buffers, so many carried tails
    blocks = list(ds)
    expected = stream(tokenizer, eos, docs)
    assert len(blocks) == len(expected) // SEQ  # only the final partial block is dropped
    assert flat(blocks) == expected[: len(blocks) * SEQ]


def test_infinite_mode_increments_epoch_and_carries_tail_across_epochs(shards, tokenizer, eos, docs):
    expected = stream(tokenizer, eos, docs)
    n = len(expected) // SEQ + 100  # several buffers into the second epoch
    ds = make(shards, tokenizer, eos, infinite=True)
    it = iter(ds)
    blocks = [next(it) for _ in range(n)]
    # ds.epoch is the reader's epoch; the state's is the epoch in which the current buffer started.
    assert ds.epoch == 1 and ds.state_dict()["epoch"] == 1
    assert flat(blocks) == (expected * 2)[: n * SEQ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_document_mask_names_the_documents_of_the_same_blocks(shards, tokenizer, eos, num_workers):
    """data.document_mask: the loader's batches become {input_ids, position_ids, document_ids}, from the same blocks
    in the same order with the same state; off, they stay LongTensor [B, T]."""
    from codeparrot.documents import eos_documents

    kw = dict(infinite=True, shuffle=True, seed=3)
    plain_loader = make_dataloader(make(shards, tokenizer, eos, **kw), 4, num_workers)
    masked_loader = make_dataloader(make(shards, tokenizer, eos, document_mask=True, **kw), 4, num_workers)
    plain, masked = first_batches(plain_loader, 30), first_batches(masked_loader, 30)
    assert all(isinstance(b, torch.Tensor) and b.shape == (4, SEQ) for b in plain)
    for a, b in zip(plain, masked):
        assert set(b) == {"input_ids", "position_ids", "document_ids"} and torch.equal(b["input_ids"], a)
        position_ids, document_ids = eos_documents(a, eos)
        assert torch.equal(b["position_ids"], position_ids) and torch.equal(b["document_ids"], document_ids)
    assert any(int(b["document_ids"].max()) > 0 for b in masked), "no block holds an EOS"
    assert masked_loader.state_dict() == plain_loader.state_dict()


def test_document_mask_holds_under_a_quality_condition(shards, tokenizer, eos):
    """evaluate's eval.quality_token path (condition_on: every file gets one bucket's token) masks documents too."""
    from codeparrot.documents import eos_documents

    t = Transforms(SpecialIds.from_tokenizer(tokenizer), quality_tokens=True, fim_rate=0.0)
    ds = make(shards, tokenizer, eos, transforms=t, condition_on=0, document_mask=True, infinite=True, shuffle=True,
              seed=3)
    batches = first_batches(make_dataloader(ds, 4, 0), 30)
    for batch in batches:
        position_ids, document_ids = eos_documents(batch["input_ids"], eos)
        assert torch.equal(batch["position_ids"], position_ids) and torch.equal(batch["document_ids"], document_ids)
    assert any(int(b["document_ids"].max()) > 0 for b in batches), "no block holds an EOS"


# --- transforms ---------------------------------------------------------------------------------

def transformed_stream(tokenizer: Tokenizer, eos: int, docs: list[str], t: Transforms, seed: int,
                       epoch: int = 0) -> list[int]:
    """The reference stream with transforms: document i is line i % 10 of file i // 10, cut at character level,
    its pieces encoded one by one, then its quality token and FIM form, then EOS."""
    ids: list[int] = []
    for i, doc in enumerate(docs):
        cut = t.cut(document_key(seed, epoch, i // 10, i % 10), len(doc))
        pieces = [tokenizer.encode(p, add_special_tokens=False).ids for p in t.pieces(doc, cut)]
        ids += t.assemble(pieces, cut, bucket_of(i)) + [eos]
    return ids


def split_documents(ids: list[int], eos: int) -> list[tuple[int, ...]]:
    """The complete EOS-terminated documents of a token list."""
    out, current = [], []
    for x in ids:
        if x == eos:
            out.append(tuple(current))
            current = []
        else:
            current.append(x)
    return out


def test_transforms_give_each_document_its_exact_form(shards, tokenizer, eos, docs, fim):
    blocks = list(make(shards, tokenizer, eos, transforms=fim, seed=3))
    expected = transformed_stream(tokenizer, eos, docs, fim, seed=3)
    assert len(blocks) == len(expected) // SEQ and flat(blocks) == expected[: len(blocks) * SEQ]
    restored = [untransform(d, fim.ids) for d in split_documents(flat(blocks), eos)]
    assert len(restored) >= len(docs) - 2
    for i, (bucket, ids) in enumerate(restored):  # the round trip: quality bucket and text come back
        assert bucket == bucket_of(i) and tokenizer.decode(list(ids)) == docs[i], i
    n_fim = sum(fim.cut(document_key(3, 0, i // 10, i % 10), len(d)) is not None for i, d in enumerate(docs))
    assert 8 <= n_fim <= 32 and expected.count(fim.ids.middle) == n_fim  # rate 0.5 of 40 documents
    assert sum(fim.ids.quality.count(x) for x in expected) == sum(bucket_of(i) != UNKNOWN_QUALITY
                                                                  for i in range(len(docs)))


@pytest.mark.parametrize("num_consumers", [2, 6])  # whole files, and record striding
def test_a_documents_transform_does_not_depend_on_the_consumer_or_the_file_order(shards, tokenizer, eos, fim,
                                                                                  num_consumers):
    def transformed(consumer: int, n: int, shuffle: bool) -> list[tuple[int, ...]]:
        ds = make(shards, tokenizer, eos, transforms=fim, shuffle=shuffle, seed=3)
        return split_documents(ds._encode(list(ds._read(_Cursor(), consumer, n, BadRecords(), False))), eos)

    alone = Counter(transformed(0, 1, False))
    assert len(alone) == 40
    assert Counter(d for c in range(num_consumers) for d in transformed(c, num_consumers, True)) == alone


def test_another_epoch_draws_other_cuts(shards, tokenizer, eos, docs, fim):
    ds = make(shards, tokenizer, eos, transforms=fim, seed=3, infinite=True)
    read = ds._read(_Cursor(), 0, 1, BadRecords(), infinite=True)
    first, second = [next(read) for _ in docs], [next(read) for _ in docs]
    assert [d.epoch for d in first + second] == [0] * len(docs) + [1] * len(docs)
    a, b = (split_documents(ds._encode(epoch), eos) for epoch in (first, second))
    def texts(transformed: list[tuple[int, ...]]) -> list[str]:  # pieces cut elsewhere tokenize differently
        return [tokenizer.decode(untransform(d, fim.ids)[1]) for d in transformed]

    assert a != b and texts(a) == texts(b) == docs
    assert split_documents(transformed_stream(tokenizer, eos, docs, fim, seed=3, epoch=1), eos) == b


@pytest.mark.parametrize("num_consumers", [1, 6])  # whole files, and record striding
def test_one_buckets_documents_under_another_buckets_token(shards, tokenizer, eos, docs, num_consumers):
    """eval.quality_bucket / eval.quality_token: only the high documents, each led by <quality_low>."""
    high, low = QUALITY_BUCKETS.index("high"), QUALITY_BUCKETS.index("low")
    t = Transforms(SpecialIds.from_tokenizer(tokenizer), quality_tokens=True)
    read = []
    for c in range(num_consumers):
        ds = make(shards, tokenizer, eos, transforms=t, only_quality=high, condition_on=low)
        read += split_documents(ds._encode(list(ds._read(_Cursor(), c, num_consumers, BadRecords(), False))), eos)
    wanted = [i for i in range(len(docs)) if bucket_of(i) == high]
    assert len(read) == len(wanted) == 10
    assert sorted(tokenizer.decode(list(d[1:])) for d in read) == sorted(docs[i] for i in wanted)
    assert {d[0] for d in read} == {t.ids.quality[low]}


def test_shuffle_permutes_deterministically(shards, tokenizer, eos):
    plain = [tuple(b.tolist()) for b in make(shards, tokenizer, eos)]
    shuffled = [tuple(b.tolist()) for b in make(shards, tokenizer, eos, shuffle=True, seed=3)]
    again = [tuple(b.tolist()) for b in make(shards, tokenizer, eos, shuffle=True, seed=3)]
    # Files come in another order, so the blocks differ, but an epoch still holds the same number of them.
    assert shuffled == again and shuffled != plain and len(shuffled) == len(plain)


def test_shuffle_permutes_blocks_within_a_buffer(shards, tokenizer, eos):
    ds = make(shards[:1], tokenizer, eos, shuffle=True, seed=3, num_of_sequences=1000)  # one file, one buffer
    plain = [tuple(b.tolist()) for b in make(shards[:1], tokenizer, eos, num_of_sequences=1000)]
    shuffled = [tuple(b.tolist()) for b in ds]
    assert shuffled != plain and Counter(shuffled) == Counter(plain)


# --- sharding -----------------------------------------------------------------------------------

def documents_of(ds: ConstantLengthDataset, consumer: int, num_consumers: int, epochs: int = 1) -> list[str]:
    """The documents `consumer` of `num_consumers` reads in its first `epochs` epochs, in order."""
    docs = ds._read(_Cursor(), consumer, num_consumers, BadRecords(), infinite=epochs > 1)
    out = []
    for doc in docs:
        if ds.epoch >= epochs:
            break
        out.append(doc.text)
    return out


def test_shuffle_deals_the_files_out_anew_each_epoch(shards, tokenizer, eos, docs):
    """The file list is permuted per (seed, epoch), then dealt to the consumers: each epoch still reads every
    document exactly once over all consumers, in a new order, identically on a re-run."""
    file_of = {d: i // 10 for i, d in enumerate(docs)}  # 10 documents per shard

    def epochs_of(consumer: int, num_consumers: int) -> list[list[str]]:
        ds = make(shards, tokenizer, eos, shuffle=True, seed=5)
        read = documents_of(ds, consumer, num_consumers, epochs=2)
        return [read[:len(read) // 2], read[len(read) // 2:]]  # each consumer gets whole files, 2 per epoch here

    alone = epochs_of(0, 1)
    assert Counter(alone[0]) == Counter(alone[1]) == Counter(docs)
    assert [file_of[d] for d in alone[0][::10]] != [file_of[d] for d in alone[1][::10]]  # a new order
    assert epochs_of(0, 1) == alone  # a function of (seed, epoch) alone
    pair = [epochs_of(c, 2) for c in (0, 1)]
    for epoch in (0, 1):
        assert Counter(pair[0][epoch] + pair[1][epoch]) == Counter(docs)  # no document twice, none missed
    assert {file_of[d] for d in pair[0][0]} != {file_of[d] for d in pair[0][1]}  # files move between consumers


@pytest.mark.parametrize("num_consumers", [1, 2, 3, 4, 6, 9])
def test_every_document_is_read_by_exactly_one_consumer(shards, tokenizer, eos, docs, num_consumers):
    ds = make(shards, tokenizer, eos)
    per_consumer = [list(documents_of(ds, c, num_consumers)) for c in range(num_consumers)]
    assert Counter(d for share in per_consumer for d in share) == Counter(docs)
    if num_consumers <= len(shards):  # whole files: consumer c owns files[c::C], in order
        for c, share in enumerate(per_consumer):
            assert share == [d for i, d in enumerate(docs) if (i // 10) % num_consumers == c]
    else:  # record striding
        for c, share in enumerate(per_consumer):
            assert share == docs[c::num_consumers]


def test_striding_fallback_is_logged_once(shards, tokenizer, eos, caplog):
    ds = make(shards, tokenizer, eos, rank=5, world_size=8)  # 8 consumers, 4 files
    with caplog.at_level(logging.INFO, logger="codeparrot.data.packing"):
        first, second = list(ds), list(ds)
    assert first and [b.tolist() for b in first] == [b.tolist() for b in second]
    assert sum("keeps every 8-th record" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture(scope="module")
def marker_docs(docs) -> list[str]:
    return [f"# marker-{i:05d}\n{docs[i % len(docs)][:400]}" for i in range(90)]


@pytest.fixture(scope="module")
def marker_tokenizer(tokenizer, marker_docs) -> Tokenizer:
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.add_tokens([f"marker-{i:05d}" for i in range(len(marker_docs))])  # one id per document
    return tok


@pytest.mark.parametrize("n_shards", [3, 6])  # fewer files than 4 consumers (striding), and more
def test_ranks_and_real_workers_split_the_corpus(marker_docs, marker_tokenizer, eos, tmp_path, n_shards):
    files = _write_shards(tmp_path, marker_docs, per_shard=-(-len(marker_docs) // n_shards))
    assert len(files) == n_shards
    got: list[tuple[int, ...]] = []
    expected: list[tuple[int, ...]] = []
    for rank in range(2):
        ds = make(files, marker_tokenizer, eos, rank=rank, world_size=2)
        for batch in make_dataloader(ds, batch_size=3, num_workers=2):
            assert batch.dtype == torch.long and batch.shape[1] == SEQ
            got += [tuple(row) for row in batch.tolist()]
        for worker in range(2):  # consumer c = rank * num_workers + worker_id
            share = list(documents_of(ds, rank * 2 + worker, 4))
            expected += blocks_of(stream(marker_tokenizer, eos, share))
    assert Counter(got) == Counter(expected)
    marker_ids = {marker_tokenizer.token_to_id(f"marker-{i:05d}") for i in range(len(marker_docs))}
    seen = Counter(t for block in got for t in block if t in marker_ids)
    assert max(seen.values()) == 1  # no document twice
    assert len(seen) >= len(marker_docs) - 4 * 3  # only the consumers' dropped final blocks are missing


# --- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("transformed", [False, True])
def test_dataset_resumes_exactly_at_every_position(shards, tokenizer, eos, fim, transformed):
    kw = dict(num_of_sequences=3, shuffle=True, infinite=True, transforms=fim if transformed else None)
    reference = list(zip(range(40), iter(make(shards, tokenizer, eos, **kw))))
    for k in range(0, 13):  # every offset within, and on the boundaries of, the first buffers
        ds = make(shards, tokenizer, eos, **kw)
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = pickle.loads(pickle.dumps(ds.state_dict()))
        assert len(state["tail"]) < SEQ and len(pickle.dumps(state)) < 4096  # small: saved every batch
        resumed = make(shards, tokenizer, eos, **kw)
        resumed.load_state_dict(state)  # before __iter__
        assert resumed.state_dict() == state
        rit = iter(resumed)
        for i in range(k, k + 8):
            assert torch.equal(next(rit), reference[i][1]), (k, i)


def _dataset_states(state) -> list[dict]:
    """The dataset states inside a StatefulDataLoader state, wherever it keeps them."""
    if isinstance(state, dict):
        if "buffer_index" in state:
            return [state]
        return [s for v in state.values() for s in _dataset_states(v)]
    return []


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", ["finite", "shuffled-infinite", "transformed-shuffled-infinite"])
def test_dataloader_resume_gives_the_uninterruptedfirst_batches(shards, tokenizer, eos, docs, fim, num_workers,
                                                                 mode):
    kw = dict(shuffle=True, infinite=True, seed=7) if mode.endswith("shuffled-infinite") else {}
    if mode.startswith("transformed"):
        kw["transforms"] = fim
    batch = 4
    epoch_batches = len(stream(tokenizer, eos, docs)) // SEQ // batch  # about one epoch of batches
    infinite = mode.endswith("shuffled-infinite")
    k = epoch_batches - 3 if infinite else epoch_batches // 2
    m = 25 if infinite else epoch_batches  # finite: run to the end of the epoch

    reference = first_batches(make_dataloader(make(shards, tokenizer, eos, **kw), batch, num_workers), k + m)

    first = make_dataloader(make(shards, tokenizer, eos, **kw), batch, num_workers)
    head = first_batches(first, k)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert len(_dataset_states(state)) == max(1, num_workers)

    second = make_dataloader(make(shards, tokenizer, eos, **kw), batch, num_workers)
    second.load_state_dict(state)
    rest = first_batches(second, m)
    assert len(head + rest) == len(reference)
    for i, (a, b) in enumerate(zip(head + rest, reference)):
        assert torch.equal(a, b), i
    if infinite:  # the resumed part crossed into the next epoch
        assert max(s["epoch"] for s in _dataset_states(state)) == 0
        assert max(s["epoch"] for s in _dataset_states(second.state_dict())) == 1


# --- bad input and geometry ---------------------------------------------------------------------

def test_bad_records_are_skipped_and_counted(docs, tokenizer, eos, tmp_path):
    lines = [json.dumps(_record(i, d)) for i, d in enumerate(docs[:6])]
    lines.insert(2, '{"content": "unterminated')
    lines.insert(5, json.dumps({"path": "no_content.py"}))
    path = tmp_path / "file-000000000000.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    ds = make([path], tokenizer, eos, num_of_sequences=1)
    blocks = list(ds)
    assert ds.bad.counts == {"invalid_json": 1, "missing_content": 1} and ds.bad.good == 6
    assert flat(blocks) == stream(tokenizer, eos, docs[:6])[: len(blocks) * SEQ]

    # Counts survive a resume exactly: the state holds them as of the buffer's start.
    ds2 = make([path], tokenizer, eos, num_of_sequences=1)
    it = iter(ds2)
    for _ in range(len(blocks) // 2):
        next(it)
    ds3 = make([path], tokenizer, eos, num_of_sequences=1)
    ds3.load_state_dict(ds2.state_dict())
    list(ds3)
    assert ds3.bad.as_dict() == ds.bad.as_dict()


def test_state_from_another_geometry_is_refused(shards, tokenizer, eos):
    ds = make(shards, tokenizer, eos)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    assert (state["consumer"], state["num_consumers"]) == (0, 1)
    with pytest.raises(ValueError, match="geometry"):
        make(shards, tokenizer, eos, rank=0, world_size=2).load_state_dict(state)
    other_rank = make(shards, tokenizer, eos, rank=1, world_size=2)
    with pytest.raises(ValueError, match="geometry"):
        other_rank.load_state_dict(make(shards, tokenizer, eos, rank=0, world_size=2).state_dict())
    with pytest.raises(ValueError, match="geometry"):
        make(shards[:3], tokenizer, eos).load_state_dict(state)

    # Through a loader: a 1-rank run's state loaded into a 2-rank run.
    loader = make_dataloader(make(shards, tokenizer, eos), 2, num_workers=0)
    first_batches(loader, 3)
    resumed = make_dataloader(make(shards, tokenizer, eos, world_size=2), 2, num_workers=0)
    resumed.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="geometry"):
        first_batches(resumed, 1)


def test_worker_state_is_refused_by_another_worker_count(shards, tokenizer, eos, monkeypatch):
    # Simulated in-process: a worker that fails at resume makes torch's worker shutdown wait ~5 s per worker.
    monkeypatch.setattr(packing, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    state = make(shards, tokenizer, eos).state_dict()
    assert (state["consumer"], state["num_consumers"]) == (1, 2)
    monkeypatch.setattr(packing, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=3))
    with pytest.raises(ValueError, match="geometry"):
        make(shards, tokenizer, eos).load_state_dict(state)
