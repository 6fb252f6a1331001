"""The train-tokenizer stage: artifact files, special token, report, lossless round trip, transformers loading."""
from __future__ import annotations

import json
import keyword

import pytest
from tokenizers import pre_tokenizers

from codeparrot.artifacts import read_manifest
from codeparrot.corpus.quality import QUALITY_BUCKETS
from codeparrot.tokenizer import (
    TOKENIZER_FILE, batched, chars_per_token, load_tokenizer, quality_token, run_train_tokenizer, special_tokens,
    split_keywords, text_encoder, train_on,
)

EOS = "<|endoftext|>"
TRICKY = [
    "café — π ≈ 3.14159 ✓ 日本語",
    "def f(x):\r\n\treturn x\t# tab\r\n",
    "\t\t\n\n   \r\n  trailing   ",
    "emoji 🦜 and zero\u200bwidth and nul \x00 byte",
    "ascii only, no newline",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(trained_tokenizer):
    cfg, _ = trained_tokenizer
    return cfg.paths.resolve("tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_artifact_files(tok_dir, trained_tokenizer):
    cfg, result = trained_tokenizer
    assert result["skipped"] is False
    for name in (TOKENIZER_FILE, "special_tokens_map.json", "tokenizer_config.json", "report.json",
                 "manifest.json", "config.yaml"):
        assert (tok_dir / name).is_file(), name
    manifest = read_manifest(tok_dir)
    assert manifest["stage"] == "train-tokenizer"
    assert manifest["config"]["tokenizer"]["vocab_size"] == cfg.tokenizer.vocab_size
    assert manifest["inputs"]["clean"] == read_manifest(cfg.paths.resolve("clean"))["fingerprint"]
    special = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert special["eos_token"] == special["bos_token"] == EOS
    tok_json = json.loads((tok_dir / TOKENIZER_FILE).read_text())
    assert tok_json["pre_tokenizer"]["type"] == "ByteLevel"
    assert tok_json["decoder"]["type"] == "ByteLevel"
    assert tok_json["model"]["type"] == "BPE"


def test_reserved_special_tokens(tok, tok_dir):
    reserved = special_tokens(EOS)
    assert reserved[:5] == [EOS, "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
    assert reserved[5:] == [quality_token(b) for b in QUALITY_BUCKETS] == ["<quality_low>", "<quality_medium>",
                                                                           "<quality_high>"]
    assert [tok.token_to_id(t) for t in reserved] == list(range(len(reserved)))  # EOS keeps id 0
    added = tok.get_added_tokens_decoder()
    assert all(added[i].content == t and added[i].special for i, t in enumerate(reserved))
    assert tok.decode([0], skip_special_tokens=False) == EOS
    report = json.loads((tok_dir / "report.json").read_text())
    assert report["special_tokens"] == {t: i for i, t in enumerate(reserved)}
    special = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert special["additional_special_tokens"] == reserved[1:]


def test_text_never_encodes_to_a_special_id(tok, tok_dir):
    for t in (load_tokenizer(tok_dir), tok):  # what every stage loads, and the test's own tokenizer after the set-up
        text_encoder(t)
        for name in special_tokens(EOS):
            ids = t.encode(f"x = 1{name}y = 2", add_special_tokens=False).ids
            assert t.token_to_id(name) not in ids, name
            assert t.decode(ids) == f"x = 1{name}y = 2"
        ids = t.encode_batch_fast(["<fim_middle>"], add_special_tokens=False)[0].ids
        assert t.token_to_id("<fim_middle>") not in ids and len(ids) > 1


def test_report(trained_tokenizer, tok, tok_dir, prepared):
    cfg, result = trained_tokenizer
    report = json.loads((tok_dir / "report.json").read_text())
    assert report == {k: result[k] for k in report}
    assert report["vocab_size"] == tok.get_vocab_size() and 257 < report["vocab_size"] <= cfg.tokenizer.vocab_size
    assert report["eos_token_id"] == tok.token_to_id(EOS)
    assert report["train_files"] == prepared[1]["train_files"]
    assert report["valid_files"] == prepared[1]["valid_files"] > 0
    assert report["chars_per_token_valid"] > 1
    assert report["train_mb_per_s"] > 0 and report["train_mb"] > 0
    assert isinstance(report["keywords_not_single_tokens"], list)
    assert report["keywords_not_single_tokens"] == split_keywords(tok)
    assert report["bad_records"]["bad"] == 0


def test_round_trip_on_stdlib_files(tok, stdlib_root, stdlib_files):
    texts = [(stdlib_root / rel).read_text() for rel in stdlib_files]
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    for text, enc in zip(texts, encodings):
        assert tok.decode(enc.ids) == text
    # the BPE merges actually compress code
    assert chars_per_token(tok, texts) > 1.5


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_unusual_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_byte_alphabet_complete(tok):
    vocab = tok.get_vocab()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert all(ch in vocab for ch in alphabet)
    every_byte = bytes(range(256)).decode("latin-1")
    assert tok.decode(tok.encode(every_byte).ids) == every_byte


def test_transformers_loads_it(tok, tok_dir, stdlib_root, stdlib_files):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert hf.eos_token == hf.bos_token == EOS
    assert hf.eos_token_id == hf.bos_token_id == tok.token_to_id(EOS)
    assert len(hf) == tok.get_vocab_size()
    for text in TRICKY[:3] + [(stdlib_root / stdlib_files[0]).read_text()]:
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text).ids
        assert hf.decode(ids) == text


def test_split_keywords_on_a_keyword_rich_tokenizer():
    # every keyword both at the start of a line and after a space, many times over
    text = "\n".join(kw + " " + " ".join(keyword.kwlist) for kw in keyword.kwlist)
    tok = train_on(batched(iter([text] * 20), 5), vocab_size=2000, min_frequency=2, eos_token=EOS)
    assert split_keywords(tok) == []


def test_split_keywords_finds_missing_on_a_tiny_vocab(prepared):
    from codeparrot.corpus.source import BadRecords, iter_records, list_shards

    cfg, _ = prepared
    texts = [r["content"] for r in iter_records(list_shards(cfg.paths.resolve("clean") / "train"), BadRecords())]
    tok = train_on(batched(iter(texts), 16), vocab_size=280, min_frequency=2, eos_token=EOS)
    missing = split_keywords(tok)
    assert "nonlocal" in missing and " nonlocal" in missing
    assert set(missing) <= set(keyword.kwlist) | {" " + kw for kw in keyword.kwlist}


def test_second_run_skips(trained_tokenizer, tok_dir):
    cfg, first = trained_tokenizer
    mtime = (tok_dir / TOKENIZER_FILE).stat().st_mtime_ns
    again = run_train_tokenizer(cfg)
    assert again["skipped"] is True
    assert again["vocab_size"] == first["vocab_size"]
    assert (tok_dir / TOKENIZER_FILE).stat().st_mtime_ns == mtime


def test_changed_setting_retrains(tmp_path, prepared, make_config):
    import shutil

    cfg, _ = prepared
    clean = cfg.paths.resolve("clean")
    work = tmp_path / "work"
    shutil.copytree(clean, work / "clean")
    small = make_config(work, f"paths.raw={cfg.paths.resolve('raw')}", "tokenizer.vocab_size=400")
    first = run_train_tokenizer(small)
    assert first["skipped"] is False and first["vocab_size"] <= 400
    assert run_train_tokenizer(small)["skipped"] is True
    bigger = make_config(work, f"paths.raw={cfg.paths.resolve('raw')}", "tokenizer.vocab_size=450")
    second = run_train_tokenizer(bigger)
    assert second["skipped"] is False and first["vocab_size"] < second["vocab_size"] <= 450


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        load_tokenizer(tmp_path)
