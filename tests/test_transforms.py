"""The data transforms (data/transforms.py): exact FIM forms, round trips, rates, determinism, quality tokens, and
the fixed-length token-shard case; and how split_dataset applies them."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from codeparrot.config import ConfigError, load_config
from codeparrot.corpus.quality import QUALITY_BUCKETS, UNKNOWN_QUALITY
from codeparrot.corpus.source import ShardWriter
from codeparrot.data.splits import split_dataset
from codeparrot.data.transforms import (FimCut, SpecialIds, Transforms, bucket_index, document_key, draw_cut,
                                        fim_join, fit_length, split_at, transform_block, untransform)
from codeparrot.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, quality_token, train_on

EOS = "<|endoftext|>"
N_DOCS = 2000


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """40 real stdlib files, some with non-ASCII characters (a cut must fall between characters, not bytes)."""
    out = []
    for f in sorted(Path(os.__file__).parent.glob("*.py")):
        text = f.read_text(encoding="utf-8")
        if 500 <= len(text) <= 12000:
            out.append(text)
    out = out[:39] + ["# café, naïve, 日本語 — ünïcödé\nx = 'ß' * 3\n" * 5]
    assert len(out) == 40
    return out


@pytest.fixture(scope="module")
def tok(texts) -> Tokenizer:
    return train_on(iter([texts]), vocab_size=600, min_frequency=2, eos_token=EOS)  # reserves the special tokens


@pytest.fixture(scope="module")
def ids(tok) -> SpecialIds:
    return SpecialIds.from_tokenizer(tok)


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def text_document(tok: Tokenizer, t: Transforms, text: str, key: bytes, bucket: int = UNKNOWN_QUALITY):
    """A document transformed as the streaming path does: character cut, pieces tokenized apart."""
    cut = t.cut(key, len(text))
    return cut, t.assemble([encode(tok, p) for p in t.pieces(text, cut)], cut, bucket)


# --- the forms ----------------------------------------------------------------------------------

def test_special_ids_are_the_tokenizers_and_an_old_tokenizer_is_refused(tok, ids):
    assert (ids.prefix, ids.middle, ids.suffix) == tuple(tok.token_to_id(t) for t in (FIM_PREFIX, FIM_MIDDLE,
                                                                                      FIM_SUFFIX))
    assert ids.quality == tuple(tok.token_to_id(quality_token(b)) for b in QUALITY_BUCKETS)
    old = Tokenizer(models.BPE())
    old.add_special_tokens([EOS])
    with pytest.raises(ValueError, match="train-tokenizer"):
        SpecialIds.from_tokenizer(old)


def test_psm_and_spm_forms_are_exact_at_token_level():
    ids = SpecialIds(prefix=1, middle=2, suffix=3, pad=4, quality=(5, 6, 7))
    doc = list(range(10, 20))
    assert split_at(doc, FimCut(False, 3, 7)) == ([10, 11, 12], [13, 14, 15, 16], [17, 18, 19])
    assert fim_join([10, 11, 12], [13, 14, 15, 16], [17, 18, 19], False, ids) == [
        1, 10, 11, 12, 3, 17, 18, 19, 2, 13, 14, 15, 16]
    assert fim_join([10, 11, 12], [13, 14, 15, 16], [17, 18, 19], True, ids) == [
        1, 3, 17, 18, 19, 2, 10, 11, 12, 13, 14, 15, 16]
    t = Transforms(ids, quality_tokens=True, fim_rate=1.0, fim_spm_rate=0.0)
    cut = FimCut(False, 3, 7)
    assert t.assemble(split_at(doc, cut), cut, 2) == [7, 1, 10, 11, 12, 3, 17, 18, 19, 2, 13, 14, 15, 16]
    assert split_at("abcdefgh", FimCut(True, 2, 5)) == ("ab", "cde", "fgh")


@pytest.mark.parametrize("spm", [False, True])
def test_round_trip_at_text_level(tok, ids, texts, spm):
    t = Transforms(ids, fim_rate=1.0, fim_spm_rate=float(spm))
    for i, text in enumerate(texts):
        cut, doc = text_document(tok, t, text, document_key(1, 0, 0, i))
        assert cut is not None and cut.spm is spm and 0 <= cut.start <= cut.end <= len(text)
        prefix, middle, suffix = (encode(tok, p) for p in split_at(text, cut))
        assert doc == fim_join(prefix, middle, suffix, spm, ids)
        assert doc[:2] == ([ids.prefix, ids.suffix] if spm else [ids.prefix, *(prefix[:1] or [ids.suffix])])
        assert tok.decode(prefix) + tok.decode(middle) + tok.decode(suffix) == text
        assert untransform(doc, ids) == (UNKNOWN_QUALITY, prefix + middle + suffix)
        assert tok.decode(untransform(doc, ids)[1]) == text


@pytest.mark.parametrize("spm", [False, True])
def test_round_trip_at_token_level(ids, spm):
    t = Transforms(ids, fim_rate=1.0, fim_spm_rate=float(spm))
    for i in range(200):
        doc = [100 + (i * 7 + j) % 50 for j in range(i % 30)]  # lengths 0..29, the empty document included
        out = t.tokens(doc, document_key(3, 1, i), UNKNOWN_QUALITY)
        assert untransform(out, ids) == (UNKNOWN_QUALITY, doc)
        assert len(out) == (len(doc) + 3 if doc else 0)  # no sentinels around an empty document
        if doc:
            assert out[0] == ids.prefix and (not spm or out[1] == ids.suffix)


def test_quality_prefix_is_exact(ids):
    doc = [100, 101, 102]
    on = Transforms(ids, quality_tokens=True)
    for bucket, name in enumerate(QUALITY_BUCKETS):
        assert bucket_index(name) == bucket
        assert on.tokens(doc, b"k", bucket) == [ids.quality[bucket], *doc]
        assert untransform([ids.quality[bucket], *doc], ids) == (bucket, doc)
    assert on.tokens(doc, b"k", UNKNOWN_QUALITY) == doc  # no known bucket: no token
    assert Transforms(ids, fim_rate=1.0).tokens(doc, b"k", 2)[0] == ids.prefix  # quality tokens off: none
    both = Transforms(ids, quality_tokens=True, fim_rate=1.0).tokens(doc, b"k", 1)  # the quality token, then FIM
    assert both[:2] == [ids.quality[1], ids.prefix] and untransform(both, ids) == (1, doc)
    assert [bucket_index(x) for x in (None, "", "best", 2, "High")] == [UNKNOWN_QUALITY] * 5


# --- the draw -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_rates_are_honoured_within_sampling_error(rate):
    cuts = [draw_cut(document_key(7, 0, i // 100, i % 100), 1000, rate, 0.3) for i in range(N_DOCS)]
    fim = [c for c in cuts if c is not None]

    def within(count: int, n: int, p: float) -> bool:  # 4 sigma of a binomial: fails by chance ~1 in 16,000
        return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))

    assert within(len(fim), N_DOCS, rate)
    assert within(sum(c.spm for c in fim), len(fim), 0.3)
    # The cut points are two sorted uniforms over [0, 1000]: their means are 1/3 and 2/3 of the length.
    n, sd = len(fim), math.sqrt(1 / 18)  # the min (and the max) of two uniforms has variance 1/18
    assert abs(sum(c.start for c in fim) / n / 1000 - 1 / 3) <= 4 * sd / math.sqrt(n)
    assert abs(sum(c.end for c in fim) / n / 1000 - 2 / 3) <= 4 * sd / math.sqrt(n)
    assert all(0 <= c.start <= c.end <= 1000 for c in fim)


def test_rate_zero_and_one_are_exact():
    keys = [document_key(0, 0, i) for i in range(500)]
    assert all(draw_cut(k, 50, 0.0, 0.5) is None for k in keys)
    assert all(draw_cut(k, 50, 1.0, 0.5) is not None for k in keys)
    assert all(draw_cut(k, 50, 1.0, 0.0).spm is False and draw_cut(k, 50, 1.0, 1.0).spm is True for k in keys)


def test_the_draw_is_a_function_of_seed_epoch_and_document_alone():
    def cuts(seed: int, epoch: int, order: range) -> dict[int, FimCut | None]:
        return {i: draw_cut(document_key(seed, epoch, 2, i), 400, 0.5, 0.5) for i in order}

    forward = cuts(1, 0, range(300))
    assert cuts(1, 0, range(299, -1, -1)) == forward  # no running state: the order of the draws does not matter
    assert cuts(1, 1, range(300)) != forward and cuts(2, 0, range(300)) != forward
    differ = sum(a != b for a, b in zip(forward.values(), cuts(1, 1, range(300)).values()))
    assert differ > 100  # another epoch re-draws (nearly) every document, not a few
    assert document_key(1, 0, 2, 3) != document_key(1, 0, 23) and document_key(1, 2, 3) != document_key(12, 3)


def test_invalid_rates_are_refused(ids):
    with pytest.raises(ValueError, match="fim_rate"):
        Transforms(ids, fim_rate=1.5)
    for override in ("data.fim_rate=1.5", "data.fim_rate=-0.1", "data.fim_spm_rate=2", "data.fim_spm_rate=nan"):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            load_config(None, [override])
    cfg = load_config(None, ["data.fim_rate=0.5", "data.fim_spm_rate=1", "data.quality_tokens=true"])
    assert (cfg.data.fim_rate, cfg.data.fim_spm_rate, cfg.data.quality_tokens) == (0.5, 1.0, True)


# --- token-shard blocks -------------------------------------------------------------------------

EOS_ID = 0


def split_at_eos(ids: list[int]) -> list[list[int]]:
    """The EOS-separated fragments of a token list (empty ones included)."""
    out: list[list[int]] = [[]]
    for x in ids:
        if x == EOS_ID:
            out.append([])
        else:
            out[-1].append(x)
    return out


def test_block_is_split_at_eos_fim_per_fragment_then_cut_to_its_length(ids):
    t = Transforms(ids, quality_tokens=True, fim_rate=1.0, fim_spm_rate=0.0)
    block = [10, 11, 12, 13, EOS_ID, 20, 21, 22, EOS_ID, 30, 31, 32]
    starts = {5: 0, 9: 2}  # documents start after each EOS; the first fragment continues one from the block before
    key = (4, 1, 17)
    fragments = [block[:4], block[5:8], block[9:]]
    cuts = [draw_cut(document_key(*key, j), len(f), 1.0, 0.0) for j, f in enumerate(fragments)]
    forms = [fim_join(*split_at(f, c), False, ids) for f, c in zip(fragments, cuts)]
    full = forms[0] + [EOS_ID, ids.quality[0]] + forms[1] + [EOS_ID, ids.quality[2]] + forms[2]
    out = transform_block(block, EOS_ID, starts, t, key)
    assert out == full[:len(block)] and len(full) == len(block) + 3 * 3 + 2  # Megatron's cut at the block's end
    assert out == transform_block(block, EOS_ID, starts, t, key)  # deterministic
    assert transform_block(block, EOS_ID, starts, t, (4, 2, 17)) != out  # another epoch, another draw

    quality_only = Transforms(ids, quality_tokens=True)
    assert transform_block([9, EOS_ID, 8, 8], EOS_ID, {0: 1, 2: 2}, quality_only, key) == [
        ids.quality[1], 9, EOS_ID, ids.quality[2]]  # the last 8s are pushed out
    assert transform_block([9, EOS_ID], EOS_ID, {0: 1}, quality_only, key) == [ids.quality[1], 9]
    plain = Transforms(ids, fim_rate=0.0)
    assert transform_block(block, EOS_ID, starts, plain, key) == block


def test_blocks_keep_seq_length_and_the_fragments_they_hold_whole(ids):
    t = Transforms(ids, quality_tokens=True, fim_rate=0.5, fim_spm_rate=0.5)
    seq = 64
    n_fim = 0
    for b in range(300):
        block = [EOS_ID if (b * 13 + j * 7) % 23 == 0 else 100 + (b + j) % 90 for j in range(seq)]
        starts = {j + 1: (b + j) % 4 for j in range(seq - 1) if block[j] == EOS_ID}
        starts = {j: (q if q < 3 else UNKNOWN_QUALITY) for j, q in starts.items()}
        out = transform_block(block, EOS_ID, starts, t, (0, 0, b))
        assert len(out) == seq
        n_fim += out.count(ids.middle)
        # Every fragment followed by an EOS inside the output is there whole, with its document's quality token.
        originals, positions = split_at_eos(block), [0] + [j + 1 for j, x in enumerate(block) if x == EOS_ID]
        for j, piece in enumerate(split_at_eos(out)[:-1]):
            assert untransform(piece, ids) == (starts.get(positions[j], UNKNOWN_QUALITY), originals[j])
    assert n_fim > 100
    assert fit_length([5, 6], 4, ids.pad) == [5, 6, ids.pad, ids.pad]  # a shorter sample is padded, as Megatron's
    assert fit_length([5, 6, 7], 2, ids.pad) == [5, 6]


# --- split_dataset ------------------------------------------------------------------------------

def test_split_dataset_applies_fim_to_train_only_and_refuses_an_old_tokenizer(tok, tmp_path):
    for split in ("train", "valid"):
        with ShardWriter(tmp_path / "clean" / split, 10) as w:
            w.write({"repo_name": "r", "path": "a.py", "content": "x = 1\n", "quality": "high"})
    cfg = load_config(None, [f"paths.workdir={tmp_path}", "data.fim_rate=0.5", "data.quality_tokens=true",
                             "data.fim_spm_rate=0.25"])
    train = split_dataset(cfg, "train", tok, 0, 1, infinite=False)
    valid = split_dataset(cfg, "valid", tok, 0, 1, infinite=False)
    assert (train.transforms.fim_rate, train.transforms.fim_spm_rate, train.transforms.quality_tokens) == (0.5, 0.25,
                                                                                                           True)
    assert (valid.transforms.fim_rate, valid.transforms.quality_tokens) == (0.0, True)  # validation: left-to-right
    off = load_config(None, [f"paths.workdir={tmp_path}"])
    assert split_dataset(off, "train", tok, 0, 1, infinite=False).transforms is None
    old = Tokenizer(models.BPE())
    old.add_special_tokens([EOS])
    with pytest.raises(ValueError, match="train-tokenizer"):
        split_dataset(cfg, "train", old, 0, 1, infinite=False)
    assert split_dataset(off, "train", old, 0, 1, infinite=False).transforms is None  # transforms off: no need


# --- token shards cut at characters ---------------------------------------------------------------

def test_shard_fim_decodes_and_cuts_like_the_streaming_path(tok, ids, texts):
    """With the tokenizer as codec, a fragment of token ids is FIM'd exactly as its text is when streaming."""
    t = Transforms(ids, quality_tokens=True, fim_rate=0.7, fim_spm_rate=0.5, codec=tok)
    n_fim = 0
    for i, text in enumerate(texts):
        key = document_key(5, 0, i)
        cut, streamed = text_document(tok, t, text, key, bucket=i % 3)
        assert t.tokens(encode(tok, text), key, i % 3) == streamed
        n_fim += cut is not None
    assert 15 < n_fim < len(texts)


def test_shard_prefixes_end_in_a_bare_newline_before_indented_lines(tok, ids):
    """The shape of every infilling prompt: `):\\n` then an indented middle. Cut at tokens, no prefix ever ends so
    (`\\n    ` is one token); cut at characters, about one prefix in 10 here does."""
    code = "".join(f"def f{i}(x):\n    y = x + {i}\n    if y:\n        return y\n    return 0\n\n" for i in range(8))
    doc = encode(tok, code)

    def bare_newline_prefixes(t: Transforms) -> int:
        found = 0
        for k in range(400):
            out = t.tokens(doc, document_key(9, k), UNKNOWN_QUALITY)
            prefix = out[1:out.index(ids.suffix)]
            middle = out[out.index(ids.middle) + 1:]
            found += tok.decode(prefix).endswith("\n") and tok.decode(middle).startswith(" ")
        return found

    assert bare_newline_prefixes(Transforms(ids, fim_rate=1.0, fim_spm_rate=0.0)) == 0  # token cut (old shards)
    assert bare_newline_prefixes(Transforms(ids, fim_rate=1.0, fim_spm_rate=0.0, codec=tok)) >= 10


def test_a_fragment_cut_inside_a_character_falls_back_to_a_token_cut(tok, ids):
    # a block boundary may fall inside a multi-byte character: such a fragment decodes to U+FFFD somewhere
    byte_tokens = [tok.token_to_id(c) for c in ("æ", "Ĺ", "¥")]  # the bytes of 日 (E6 97 A5), one token each
    assert None not in byte_tokens
    frag = byte_tokens[1:] + encode(tok, "x = 1\n" * 5)
    assert "\ufffd" in tok.decode(frag)
    t = Transforms(ids, fim_rate=1.0, fim_spm_rate=0.0, codec=tok)
    out = t.tokens(frag, document_key(1), UNKNOWN_QUALITY)
    assert untransform(out, ids) == (UNKNOWN_QUALITY, frag)  # the ids kept exactly, cut between tokens
