"""Pretokenize stage and TokenShardDataset: format, counts, order, sharding, exact resume, mismatches, pipeline."""
from __future__ import annotations

import copy
import json
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from codeparrot.artifacts import fingerprint, read_manifest
from codeparrot.corpus.source import list_shards
from codeparrot.data.packing import make_dataloader
from codeparrot.corpus.quality import UNKNOWN_QUALITY
from codeparrot.data.pretokenize import (DOCS_DTYPE, FORMAT_VERSION, TokenizerMismatch, load_meta, run_pretokenize,
                                         token_dtype)
from codeparrot.data.tokens import TokenShardDataset, block_order
from codeparrot.data.transforms import SpecialIds, Transforms, transform_block
from codeparrot.tokenizer import load_tokenizer, run_train_tokenizer

from conftest import EXPORT_SHARD_RECORDS, VALID_FRACTION, first_batches, read_all, read_tokens, summaries

SEQ = 32
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


@pytest.fixture(scope="module")
def pretok(trained_tokenizer, tmp_path_factory):
    """run_pretokenize on the session's prepared corpus and tokenizer, into a tokens/ of this module's own."""
    base, _ = trained_tokenizer
    cfg = copy.deepcopy(base)
    cfg.paths.tokens = str(tmp_path_factory.mktemp("pretok") / "tokens")
    cfg.data.pretokenize_num_proc = 2
    return cfg, run_pretokenize(cfg)


@pytest.fixture(scope="module")
def tokens_dir(pretok) -> Path:
    return pretok[0].paths.resolve("tokens")


def expected_stream(cfg, split: str) -> list[int]:
    """Each document of clean/<split>, in shard order, encoded on its own and followed by EOS."""
    tok = load_tokenizer(cfg.paths.resolve("tokenizer"))
    eos = tok.token_to_id(cfg.tokenizer.eos_token)
    ids: list[int] = []
    for record in read_all(cfg.paths.resolve("clean") / split):
        ids += tok.encode(record["content"], add_special_tokens=False).ids + [eos]
    return ids


def make(tokens_dir, **kw) -> TokenShardDataset:
    return TokenShardDataset(tokens_dir, kw.pop("split", "train"), kw.pop("seq_length", SEQ), **kw)


@pytest.fixture(scope="module")
def fim(pretok) -> Transforms:
    """Both transforms on, FIM at 0.5 in both orders, with the ids of the stage's tokenizer."""
    tok = load_tokenizer(pretok[0].paths.resolve("tokenizer"))
    return Transforms(SpecialIds.from_tokenizer(tok), quality_tokens=True, fim_rate=0.5, fim_spm_rate=0.5)


@pytest.fixture(scope="module")
def graded_dir(tokens_dir, tmp_path_factory) -> Path:
    """A copy of tokens/ whose .docs give document j of every file the bucket j % 4 (3 = unknown), so quality
    tokens are exercised whether or not this corpus was prepared with a quality signal."""
    copy_dir = tmp_path_factory.mktemp("graded") / "tokens"
    shutil.copytree(tokens_dir, copy_dir)
    for split in ("train", "valid"):
        for f in load_meta(copy_dir)["splits"][split]["files"]:
            docs = np.fromfile(copy_dir / f["docs"], dtype=DOCS_DTYPE)
            docs["quality"] = [j % 4 if j % 4 < 3 else UNKNOWN_QUALITY for j in range(len(docs))]
            docs.tofile(copy_dir / f["docs"])
    return copy_dir


# --- the stage ----------------------------------------------------------------------------------

def test_dtype_is_uint16_up_to_65535_ids_else_uint32():
    assert token_dtype(600) == np.uint16 and token_dtype(32768) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(100_000) == np.uint32 and token_dtype(2 ** 32) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(2 ** 32 + 1)


def test_pretokenize_writes_shards_meta_and_manifest(pretok, tokens_dir):
    cfg, result = pretok
    assert result["skipped"] is False and result["dtype"] == "uint16"
    meta = load_meta(tokens_dir)
    tok_dir, clean = cfg.paths.resolve("tokenizer"), cfg.paths.resolve("clean")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == load_tokenizer(tok_dir).get_vocab_size() <= 65535
    assert meta["tokenizer_fingerprint"] == fingerprint(tok_dir)
    assert read_manifest(tokens_dir)["inputs"] == {"clean": fingerprint(clean), "tokenizer": fingerprint(tok_dir),
                                                   "format_version": str(FORMAT_VERSION)}
    for split in ("train", "valid"):
        info = meta["splits"][split]
        sources = list_shards(clean / split)
        assert [f["source"] for f in info["files"]] == [str(s.relative_to(clean)) for s in sources]
        assert len(info["files"]) == len(sources) and (split != "train" or len(sources) > 1)
        for f, src in zip(info["files"], sources):  # one .bin per input shard, sized by its token count
            assert (tokens_dir / f["path"]).stat().st_size == 2 * f["tokens"]
            assert f["documents"] == len(read_all(src))
        assert info["tokens"] == sum(f["tokens"] for f in info["files"])
        assert info["documents"] == sum(f["documents"] for f in info["files"]) == len(read_all(clean / split))
        assert result[f"{split}_tokens"] == info["tokens"] and result[f"{split}_documents"] == info["documents"]
        # The concatenated .bin files are the documents encoded one by one and joined by EOS (EOS after each).
        ids = read_tokens(tokens_dir, split)
        assert ids.dtype == np.uint16
        assert ids.tolist() == expected_stream(cfg, split)
        assert int((ids == meta["eos_token_id"]).sum()) >= info["documents"]
    assert run_pretokenize(cfg)["skipped"] is True  # up to date: skipped


def test_one_process_writes_the_same_bytes(pretok, tokens_dir, tmp_path):
    cfg = copy.deepcopy(pretok[0])
    cfg.paths.tokens = str(tmp_path / "tokens")
    cfg.data.pretokenize_num_proc = 1
    assert run_pretokenize(cfg)["num_proc"] == 1
    meta = load_meta(tokens_dir)
    assert load_meta(tmp_path / "tokens") == meta
    for split in ("train", "valid"):
        for f in meta["splits"][split]["files"]:
            assert (tmp_path / "tokens" / f["path"]).read_bytes() == (tokens_dir / f["path"]).read_bytes()


# --- the dataset --------------------------------------------------------------------------------

def test_blocks_are_seq_length_slices_of_the_stream_across_files(tokens_dir):
    ids = read_tokens(tokens_dir, "train").astype(np.int64)
    ds = make(tokens_dir)
    blocks = list(ds)
    assert len(blocks) == ds.n_blocks == len(ids) // SEQ
    assert all(b.shape == (SEQ,) and b.dtype == torch.long for b in blocks)
    assert torch.cat(blocks).tolist() == ids[: len(blocks) * SEQ].tolist()  # only the split's last partial block
    assert any(s % SEQ for s in ds.starts[1:-1]), "no block spans a file boundary in this corpus"


def test_order_is_a_deterministic_permutation_per_seed_and_epoch(tokens_dir):
    plain = [tuple(b.tolist()) for b in make(tokens_dir)]
    a = [tuple(b.tolist()) for b in make(tokens_dir, shuffle=True, seed=5)]
    again = [tuple(b.tolist()) for b in make(tokens_dir, shuffle=True, seed=5)]
    other_seed = [tuple(b.tolist()) for b in make(tokens_dir, shuffle=True, seed=6)]
    assert a == again and a != plain and a != other_seed and Counter(a) == Counter(plain)
    n = len(plain)
    assert block_order(n, 5, 0, True).tolist() == block_order(n, 5, 0, True).tolist()
    assert block_order(n, 5, 1, True).tolist() != block_order(n, 5, 0, True).tolist()
    assert sorted(block_order(n, 5, 1, True).tolist()) == list(range(n))
    assert [plain[i] for i in block_order(n, 5, 0, True)] == a


@pytest.mark.parametrize("num_consumers", [1, 2, 3, 5])
def test_consumers_split_the_blocks_exactly(tokens_dir, num_consumers):
    every = [tuple(b.tolist()) for b in make(tokens_dir)]
    order = block_order(len(every), 9, 0, True)
    got = []
    for rank in range(num_consumers):
        share = [tuple(b.tolist()) for b in make(tokens_dir, shuffle=True, seed=9, rank=rank,
                                                 world_size=num_consumers)]
        assert share == [every[i] for i in order[rank::num_consumers]]
        got += share
    assert Counter(got) == Counter(every)


def test_infinite_mode_moves_to_the_next_epoch_order(tokens_dir):
    every = [b.tolist() for b in make(tokens_dir)]
    n = len(every)
    ds = make(tokens_dir, infinite=True, shuffle=True, seed=2, rank=1, world_size=2)
    it = iter(ds)
    per_epoch = len(block_order(n, 2, 0, True)[1::2])
    got = [next(it).tolist() for _ in range(per_epoch + 7)]
    assert ds.epoch == 1 and ds.state_dict()["epoch"] == 1 and ds.state_dict()["position"] == 7
    assert got[:per_epoch] == [every[i] for i in block_order(n, 2, 0, True)[1::2]]
    assert got[per_epoch:] == [every[i] for i in block_order(n, 2, 1, True)[1::2][:7]]


@pytest.mark.parametrize("transformed", [False, True])
def test_dataset_resumes_exactly_at_every_position(graded_dir, fim, transformed):
    tokens_dir = graded_dir
    kw = dict(infinite=True, shuffle=True, seed=4, transforms=fim if transformed else None)
    n = make(tokens_dir).n_blocks
    reference = list(zip(range(n + 10), iter(make(tokens_dir, **kw))))
    for k in list(range(0, 6)) + [n - 1, n, n + 1]:  # the start, and around the epoch boundary
        ds = make(tokens_dir, **kw)
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = pickle.loads(pickle.dumps(ds.state_dict()))
        assert len(pickle.dumps(state)) < 1024
        resumed = make(tokens_dir, **kw)
        resumed.load_state_dict(state)  # before __iter__
        assert resumed.state_dict() == state
        rit = iter(resumed)
        for i in range(k, k + 5):
            assert torch.equal(next(rit), reference[i][1]), (k, i)


@pytest.mark.parametrize("num_workers,transformed", [(0, False), (2, False), (2, True)])
def test_dataloader_resume_gives_the_uninterruptedfirst_batches(graded_dir, fim, num_workers, transformed):
    tokens_dir = graded_dir
    kw = dict(infinite=True, shuffle=True, seed=7, transforms=fim if transformed else None)
    batch = 4
    epoch_batches = make(tokens_dir).n_blocks // batch
    k, m = epoch_batches - 3, 20  # stop just before the epoch ends; the resumed part crosses into epoch 1
    reference = first_batches(make_dataloader(make(tokens_dir, **kw), batch, num_workers), k + m)

    first = make_dataloader(make(tokens_dir, **kw), batch, num_workers)
    head = first_batches(first, k)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    second = make_dataloader(make(tokens_dir, **kw), batch, num_workers)
    second.load_state_dict(state)
    rest = first_batches(second, m)
    assert len(head + rest) == len(reference) == k + m
    for i, (a, b) in enumerate(zip(head + rest, reference)):
        assert torch.equal(a, b), i
    states = [s for s in _dataset_states(second.state_dict())]
    assert len(states) == max(1, num_workers) and max(s["epoch"] for s in states) == 1


def test_both_data_paths_give_the_same_document_boundaries(pretok, tokens_dir):
    """data.document_mask: streaming and token shards cut the same tokens into the same blocks, and both name the
    same documents in them (packing.DocumentBlocks, documents.eos_documents, on either path)."""
    from codeparrot.data.packing import ConstantLengthDataset

    cfg = pretok[0]
    tok = load_tokenizer(cfg.paths.resolve("tokenizer"))
    eos = tok.token_to_id(cfg.tokenizer.eos_token)
    streaming = ConstantLengthDataset(list_shards(cfg.paths.resolve("clean") / "train"), tok, SEQ, eos,
                                      num_of_sequences=4, document_mask=True)
    shards = make(tokens_dir, document_mask=True)
    assert shards.eos_token_id == eos
    a, b = (list(make_dataloader(ds, 4, 0)) for ds in (streaming, shards))  # the whole split
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert set(x) == set(y) == {"input_ids", "position_ids", "document_ids"}
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert sum(int(x["document_ids"].amax()) for x in a) > 10, "few blocks hold an EOS"


@pytest.mark.slow
def test_training_with_document_mask_runs(pretok, tmp_path):
    """A few steps of `codeparrot train` from token shards with data.document_mask=true, gpt2 then llama."""
    from conftest import SUBPROCESS_ENV

    cfg = pretok[0]
    for arch in ("gpt2", "llama"):
        cmd = [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={cfg.paths.workdir}",
               f"paths.tokenizer={cfg.paths.resolve('tokenizer')}", f"paths.clean={cfg.paths.resolve('clean')}",
               f"paths.tokens={cfg.paths.resolve('tokens')}", f"paths.runs={tmp_path / arch}", "data.pretokenized=true",
               "data.document_mask=true", f"model.arch={arch}", f"data.seq_length={SEQ}", "model.n_layer=1",
               "model.n_head=2", "model.n_embd=32", "train.micro_batch_size=4", "train.max_steps=3",
               "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=3", "train.save_interval=3",
               "train.mixed_precision=no", "eval.batch_size=4", "eval.max_batches=2"]
        proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = tmp_path / arch / "default" / "logs" / "metrics.jsonl"
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        losses = [r["train/loss"] for r in lines if "train/loss" in r]
        assert len(losses) == 3 and all(np.isfinite(losses))
        assert any("eval/loss" in r for r in lines)


# --- transforms ---------------------------------------------------------------------------------

def document_starts(directory: Path, split: str) -> dict[int, int]:
    """{global token offset: bucket} of every document of a split, from its .docs files read whole."""
    meta, out, base = load_meta(directory), {}, 0
    for f in meta["splits"][split]["files"]:
        docs = np.fromfile(directory / f["docs"], dtype=DOCS_DTYPE)
        out.update({base + int(d["start"]): int(d["quality"]) for d in docs})
        base += f["tokens"]
    return out


def test_transformed_blocks_are_transform_block_of_the_plain_ones(graded_dir, fim):
    plain = [b.tolist() for b in make(graded_dir)]
    starts = document_starts(graded_dir, "train")
    eos = load_meta(graded_dir)["eos_token_id"]
    for epoch in (0, 1):
        ds = make(graded_dir, shuffle=True, seed=5, transforms=fim)
        order = block_order(len(plain), 5, epoch, True)
        got = [ds.sample(int(b), epoch).tolist() for b in order]
        expected = [transform_block(plain[b], eos, {p - b * SEQ: q for p, q in starts.items()
                                                    if b * SEQ <= p < (b + 1) * SEQ}, fim, (5, epoch, int(b)))
                    for b in order]
        assert got == expected and all(len(b) == SEQ for b in got)
        if epoch == 0:
            assert [b.tolist() for b in ds] == got  # iteration yields exactly these samples
            first = dict(zip(order.tolist(), got))
        else:
            assert sum(first[int(b)] != x for b, x in zip(order, got)) > len(got) // 4  # another epoch re-draws
    flat_got = [t for b in got for t in b]
    assert flat_got.count(fim.ids.middle) > 10 and sum(flat_got.count(q) for q in fim.ids.quality) > 10


def test_quality_tokens_need_the_docs_index_fim_alone_does_not(graded_dir, fim, tmp_path):
    copy_dir = tmp_path / "tokens"
    shutil.copytree(graded_dir, copy_dir)
    victim = load_meta(copy_dir)["splits"]["train"]["files"][1]["docs"]
    (copy_dir / victim).unlink()
    with pytest.raises(ValueError, match="rerun `codeparrot pretokenize`"):
        make(copy_dir, transforms=fim)
    fim_only = Transforms(fim.ids, fim_rate=0.5)
    ds = make(copy_dir, transforms=fim_only)
    assert [b.tolist() for b in ds] == [b.tolist() for b in make(graded_dir, transforms=fim_only)]
    assert make(copy_dir, transforms=Transforms(fim.ids)).transforms is None  # nothing on: the plain blocks


def _dataset_states(state) -> list[dict]:
    if isinstance(state, dict):
        if state.get("kind") == "token_shards":
            return [state]
        return [s for v in state.values() for s in _dataset_states(v)]
    return []


def test_state_from_another_geometry_is_refused(tokens_dir):
    ds = make(tokens_dir, shuffle=True, seed=1)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    assert (state["consumer"], state["num_consumers"], state["position"]) == (0, 1, 1)
    with pytest.raises(ValueError, match="geometry"):
        make(tokens_dir, shuffle=True, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="geometry"):
        make(tokens_dir, shuffle=True, seed=1, seq_length=SEQ * 2).load_state_dict(state)
    with pytest.raises(ValueError, match="geometry"):
        make(tokens_dir, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="geometry"):
        make(tokens_dir, split="valid", shuffle=True, seed=1).load_state_dict(state)
    # Through a loader: a 1-rank run's state loaded into a 2-rank run fails when iteration starts.
    loader = make_dataloader(make(tokens_dir), 2, num_workers=0)
    first_batches(loader, 3)
    resumed = make_dataloader(make(tokens_dir, world_size=2), 2, num_workers=0)
    resumed.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="geometry"):
        first_batches(resumed, 1)


def test_blocks_skip_empty_files(tokens_dir, tmp_path):
    """A shard whose records were all bad leaves an empty .bin; blocks run across it."""
    copy_dir = tmp_path / "tokens"
    shutil.copytree(tokens_dir, copy_dir)
    meta = load_meta(copy_dir)
    files = meta["splits"]["train"]["files"]
    (copy_dir / "train" / "empty.bin").write_bytes(b"")
    files[1:1] = [{"path": "train/empty.bin", "source": "train/empty.json.gz", "tokens": 0, "documents": 0}]
    files.append({"path": "train/empty.bin", "source": "train/empty.json.gz", "tokens": 0, "documents": 0})
    (copy_dir / "meta.json").write_text(json.dumps(meta))
    ds = make(copy_dir)
    assert ds.starts[1] == ds.starts[2] and ds.starts[1] % SEQ, "no block spans the empty file"
    assert [b.tolist() for b in ds] == [b.tolist() for b in make(tokens_dir)]


def test_truncated_or_missing_shards_are_refused(tokens_dir, tmp_path):
    copy_dir = tmp_path / "tokens"
    shutil.copytree(tokens_dir, copy_dir)
    meta = load_meta(copy_dir)
    victim = copy_dir / meta["splits"]["train"]["files"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(ValueError, match="does not hold"):
        make(copy_dir)
    with pytest.raises(FileNotFoundError, match="pretokenize"):
        make(tmp_path / "nowhere")


def test_tokens_from_another_tokenizer_stop_the_run(pretok, tokens_dir, tmp_path):
    cfg = pretok[0]
    fp = fingerprint(cfg.paths.resolve("tokenizer"))
    make(tokens_dir, tokenizer_fingerprint=fp)  # the matching tokenizer is accepted
    with pytest.raises(TokenizerMismatch, match="rerun `codeparrot pretokenize`"):
        make(tokens_dir, tokenizer_fingerprint="0123456789abcdef")

    other = copy.deepcopy(cfg)
    other.paths.tokenizer = str(tmp_path / "tokenizer")
    other.tokenizer.vocab_size = 500
    run_train_tokenizer(other)
    assert fingerprint(tmp_path / "tokenizer") != fp
    proc = subprocess.run(
        [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={cfg.paths.workdir}",
         f"paths.raw={cfg.paths.raw}", f"paths.tokens={tokens_dir}", f"paths.tokenizer={tmp_path / 'tokenizer'}",
         f"paths.runs={tmp_path / 'runs'}", "data.pretokenized=true", "data.seq_length=32", "train.max_steps=1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "made by tokenizer" in proc.stderr and "codeparrot pretokenize" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


# --- pipeline -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_pretokenizes_then_skips(tmp_path, stdlib_root, split_seed):
    work = tmp_path / "work"
    args = [sys.executable, "-m", "codeparrot", "pipeline", "--config", REPO / "configs" / "tiny.yaml",
            f"paths.workdir={work}", "tokenizer.vocab_size=600", "tokenizer.n_examples=200",
            "tokenizer.report_valid_files=50", f"corpus.valid_fraction={VALID_FRACTION}",
            f"corpus.split_seed={split_seed}", f"corpus.export_shard_records={EXPORT_SHARD_RECORDS}",
            f"corpus.local_roots={stdlib_root}", "corpus.source=local", "data.pretokenized=true",
            "train.max_steps=2", "train.eval_interval=1", "train.save_interval=2", "eval.max_batches=1",
            "data.seq_length=32", "train.micro_batch_size=2", "eval.humaneval=false", "sft.enabled=false"]
    first = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = summaries(first.stdout)
    assert list(stages) == ["export-local", "prepare", "train-tokenizer", "pretokenize", "train", "evaluate"]
    assert all(s.get("skipped", "False") == "False" for s in stages.values()), stages
    meta = load_meta(work / "tokens")
    assert int(stages["pretokenize"]["train_tokens"]) == meta["splits"]["train"]["tokens"] > 0
    manifest = read_manifest(work / "tokens")
    assert manifest["inputs"] == {"clean": read_manifest(work / "clean")["fingerprint"],
                                  "tokenizer": read_manifest(work / "tokenizer")["fingerprint"],
                                  "format_version": str(FORMAT_VERSION)}
    run_cfg = (work / "runs" / "tiny" / "config.yaml").read_text()
    assert "pretokenized: true" in run_cfg

    second = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    again = summaries(second.stdout)
    assert list(again) == list(stages)
    assert all(s.get("skipped") == "True" for s in again.values()), again
    assert json.loads((work / "tokens" / "meta.json").read_text()) == meta
