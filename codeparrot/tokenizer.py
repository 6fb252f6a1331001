"""The `train-tokenizer` stage: byte-level BPE on the clean corpus, saved with a quality report."""
from __future__ import annotations

import json
import keyword
import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import Config
from .corpus.quality import QUALITY_BUCKETS
from .corpus.source import BadRecords, iter_records, list_shards, utf8_len
from .logs import progress
from .stage import Stage

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
BATCH_FILES = 256  # files handed to the trainer per batch

# Fill-in-the-middle sentinels, as SantaCoder and StarCoder name them.
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)


def quality_token(bucket: str) -> str:
    """The special token that stands for a quality bucket (corpus/quality.py): `<quality_high>`."""
    if bucket not in QUALITY_BUCKETS:
        raise ValueError(f"unknown quality bucket {bucket!r}; one of: {', '.join(QUALITY_BUCKETS)}")
    return f"<quality_{bucket}>"


def special_tokens(eos_token: str) -> list[str]:
    """Every reserved token in id order: EOS first (id 0, as before), then the FIM sentinels, then the quality
    tokens. The order is fixed, so every tokenizer of the project gives them the same ids."""
    return [eos_token, *FIM_TOKENS, *(quality_token(b) for b in QUALITY_BUCKETS)]


def new_tokenizer() -> Tokenizer:
    """An untrained GPT-2-style byte-level BPE: no prefix space, byte-level decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def new_trainer(vocab_size: int, min_frequency: int, eos_token: str, show_progress: bool) -> trainers.BpeTrainer:
    """A trainer with the full 256-byte alphabet, so every input byte stays encodable."""
    return trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens(eos_token),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )


def iter_contents(files: list[Path], limit: int, bad: BadRecords) -> Iterator[str]:
    """The first `limit` file contents of a split."""
    return (r["content"] for r in islice(iter_records(files, bad), limit))


def batched(items: Iterator[str], n: int) -> Iterator[list[str]]:
    """Lists of up to n items."""
    while batch := list(islice(items, n)):
        yield batch


def save_tokenizer(tok: Tokenizer, directory: Path, eos_token: str) -> None:
    """Write tokenizer.json plus the small files `PreTrainedTokenizerFast.from_pretrained` reads."""
    tok.save(str(directory / TOKENIZER_FILE))
    special = {"bos_token": eos_token, "eos_token": eos_token, "unk_token": eos_token,
               "additional_special_tokens": [t for t in special_tokens(eos_token)[1:] if tok.token_to_id(t) is not None]}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    # No model_max_length: a tokenizer knows no sequence length; each checkpoint writes its model's (runs.py).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def set_model_max_length(directory: Path, model_max_length: int) -> None:
    """Record the longest input a model takes in the `tokenizer_config.json` beside it (a checkpoint's copy)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = model_max_length
    path.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer of a tokenizer artifact or a checkpoint directory, set to encode text as text."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `codeparrot train-tokenizer` first")
    return text_encoder(Tokenizer.from_file(str(path)))


def text_encoder(tok: Tokenizer) -> Tokenizer:
    """`tok`, set so that a special token's string inside a text (a file that mentions `<|endoftext|>` or
    `<fim_middle>`) encodes as ordinary text: only code that asks for a special id by name gets one."""
    tok.encode_special_tokens = True
    return tok


def special_token_ids(tok: Tokenizer, eos_token: str) -> dict[str, int | None]:
    """Each reserved token's id in `tok` (None where an older tokenizer lacks it)."""
    return {t: tok.token_to_id(t) for t in special_tokens(eos_token)}


def split_keywords(tok: Tokenizer) -> list[str]:
    """Python keywords that are not one token, bare or after a space (as they appear mid-line)."""
    missing = []
    for kw in keyword.kwlist:
        for form in (kw, " " + kw):
            if len(tok.encode(form, add_special_tokens=False).ids) != 1:
                missing.append(form)
    return missing


def chars_per_token(tok: Tokenizer, texts: list[str]) -> float:
    """Characters per token over whole files (higher is better compression)."""
    # encode_batch_fast skips the offsets we don't need: about 1.5x faster than encode_batch here
    n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    return sum(len(t) for t in texts) / max(n_tokens, 1)


def train_on(texts: Iterator[list[str]], vocab_size: int, min_frequency: int, eos_token: str,
             length: int | None = None, show_progress: bool = False) -> Tokenizer:
    """Train a fresh tokenizer on batches of texts."""
    tok = new_tokenizer()
    tok.train_from_iterator(texts, new_trainer(vocab_size, min_frequency, eos_token, show_progress), length=length)
    return text_encoder(tok)


def _build(cfg: Config, tmp: Path) -> dict[str, Any]:
    """Train on the first `tokenizer.n_examples` files of clean/train, report on clean/valid, save into `tmp`."""
    clean, t = cfg.paths.resolve("clean"), cfg.tokenizer
    bad = BadRecords(max_ratio=cfg.corpus.max_bad_ratio)
    n_bytes = 0

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal n_bytes
        for text in texts:
            n_bytes += utf8_len(text)
            yield text

    start = time.perf_counter()
    contents = counted(iter_contents(list_shards(clean / "train"), t.n_examples, bad))
    batches = progress(batched(contents, BATCH_FILES), desc="train-tokenizer", unit=f"x{BATCH_FILES} files")
    tok = train_on(batches, t.vocab_size, t.min_frequency, t.eos_token)
    train_seconds = time.perf_counter() - start
    bad.check(final=True)
    n_train_files = bad.good

    valid_texts = list(iter_contents(list_shards(clean / "valid"), t.report_valid_files, bad))
    report = {
        "vocab_size": tok.get_vocab_size(),
        "eos_token_id": tok.token_to_id(t.eos_token),
        "special_tokens": special_token_ids(tok, t.eos_token),
        "train_files": n_train_files,
        "train_mb": round(n_bytes / 1e6, 2),
        "train_seconds": round(train_seconds, 2),
        "train_mb_per_s": round(n_bytes / 1e6 / max(train_seconds, 1e-9), 2),
        "valid_files": len(valid_texts),
        "chars_per_token_valid": round(chars_per_token(tok, valid_texts), 3) if valid_texts else None,
        "keywords_not_single_tokens": split_keywords(tok),
        "bad_records": bad.as_dict(),
    }
    save_tokenizer(tok, tmp, t.eos_token)
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("train-tokenizer: vocab %d, %.2f chars/token on valid, %.1f MB/s",
             report["vocab_size"], report["chars_per_token_valid"] or 0.0, report["train_mb_per_s"])
    return report


# max_bad_ratio decides whether it is written at all.
TRAIN_TOKENIZER = Stage(name="train-tokenizer", output="tokenizer", inputs=("clean",), build=_build,
                        keys=("tokenizer", "corpus.max_bad_ratio"),
                        help="train the byte-level BPE tokenizer on clean/train")


def run_train_tokenizer(cfg: Config) -> dict[str, Any]:
    """Train the tokenizer of `cfg` into `paths.tokenizer`; skipped when its manifest already matches."""
    return TRAIN_TOKENIZER.run(cfg)
