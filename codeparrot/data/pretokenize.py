"""The `pretokenize` stage: clean/ encoded once into flat token shards, `tokens/`, and the helpers of that format.

Format of `tokens/` (a contract, see DESIGN.md):
- `train/*.bin`, `valid/*.bin`: one file per input shard of `clean/<split>/`, flat little-endian token ids
  (`uint16`, or `uint32` when the vocabulary is larger than 65535); every document is followed by EOS, and EOS
  appears nowhere else (text that spells it is encoded as text).
- `train/*.docs`, `valid/*.docs` beside each `.bin`: one record per document, DOCS_DTYPE = (start: uint64, the
  offset of its first token in the `.bin`; quality: uint8, its index in corpus/quality.py's QUALITY_BUCKETS, or
  UNKNOWN_QUALITY), what the data transforms need (data/transforms.py) without re-reading clean/.
- `meta.json`: format version, dtype, vocab size, EOS id, the tokenizer's fingerprint, and per split the token and
  document counts, in total and per file, with the files in reading order.
- `manifest.json` (+ `config.yaml`): the stage's identity, so `pipeline` skips it while clean/ and tokenizer/ match.
`data/tokens.py` reads it (TokenShardDataset). This module does not import torch: its workers start in a fraction
of a second. The shards are encoded one task per input shard on corpus.executor (data/pretokenize_task.py: datatrove
locally, on Slurm or on Ray, resumable), or on our own process pool with corpus.executor=pool.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import fingerprint
from ..config import Config, ConfigError, identity
from ..corpus.source import SHARD_SUFFIXES, BadRecords, list_shards
from ..logs import progress_bar
from ..procs import WorkerPool
from ..stage import Stage
from .encode_shard import DOCS_DTYPE, _get_tokenizer, docs_path, tokenize_shard  # noqa: F401 (DOCS_DTYPE: the format's)

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT = "codeparrot-tokens"
FORMAT_VERSION = 2  # 2: the .docs files; EOS only between documents
SPLITS = ("train", "valid")


class TokenizerMismatch(ConfigError):
    """Token shards made by another tokenizer than the one a run uses (paths.tokens and paths.tokenizer disagree)."""


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


def _bin_name(source: Path, index: int) -> str:
    stem = source.name
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{index:06d}-{stem}.bin"  # the index keeps names unique when shards sit in subdirectories


# --- the stage ----------------------------------------------------------------------------------

def _encode_all(tasks: list[tuple], num_proc: int) -> list[dict[str, Any]]:
    """tokenize_shard over every task, in task order, with a progress bar."""
    results = []
    bar = progress_bar(total=len(tasks), desc="pretokenize", unit="shard")
    # One process: encode_batch uses every core through tokenizers' own thread pool.
    with WorkerPool(num_proc) as pool:
        for result in pool.map(tokenize_shard, tasks):
            results.append(result)
            bar.update(1)
            bar.set_postfix_str(f"{sum(r['tokens'] for r in results) / 1e6:.1f}M tokens")
    bar.close()
    return results


def _splits_meta(sources: dict[str, list[Path]], results: list[dict[str, Any]], clean: Path,
                 bad: BadRecords) -> dict[str, Any]:
    """meta.json's `splits`, adding each shard's bad records to `bad`."""
    splits: dict[str, Any] = {}
    it = iter(results)
    for split in SPLITS:
        files = []
        for i, src in enumerate(sources[split]):
            r = next(it)
            bad.good += r["bad"]["good"]
            for kind, n in r["bad"]["counts"].items():
                bad.counts[kind] = bad.counts.get(kind, 0) + n
            name = _bin_name(src, i)
            files.append({"path": f"{split}/{name}", "docs": f"{split}/{docs_path(name)}",
                          "source": str(src.relative_to(clean)), "tokens": r["tokens"], "documents": r["documents"]})
        splits[split] = {"tokens": sum(f["tokens"] for f in files),
                         "documents": sum(f["documents"] for f in files), "files": files}
    return splits


def _build(cfg: Config, tmp: Path) -> dict[str, Any]:
    """Encode `clean/{train,valid}` with the trained tokenizer into `tmp` (one .bin per input shard)."""
    clean, tok_dir = cfg.paths.resolve("clean"), cfg.paths.resolve("tokenizer")
    tokenizer_file = tok_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found; run `codeparrot train-tokenizer` first")
    tok = _get_tokenizer(str(tokenizer_file))
    eos_token = cfg.tokenizer.eos_token
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"the tokenizer at {tok_dir} has no {eos_token!r} token (tokenizer.eos_token)")
    dtype = token_dtype(tok.get_vocab_size())
    sources = {split: list_shards(clean / split) if (clean / split).is_dir() else [] for split in SPLITS}
    if not sources["train"]:
        raise FileNotFoundError(f"no shards under {clean / 'train'}; run `codeparrot prepare` first")
    for split in SPLITS:
        (tmp / split).mkdir()
    tasks = [(str(src), str(tmp / split / _bin_name(src, i)), str(tokenizer_file), eos_id, dtype.name)
             for split in SPLITS for i, src in enumerate(sources[split])]
    num_proc = max(1, min(cfg.data.pretokenize_num_proc or os.cpu_count() or 1, len(tasks)))

    start = time.perf_counter()
    if cfg.corpus.executor == "pool":
        results = _encode_all(tasks, num_proc)
    else:
        from .pretokenize_task import encode_on_executor

        stage_identity = {"config": identity(cfg, PRETOKENIZE.keys), "inputs": PRETOKENIZE.input_fingerprints(cfg),
                          "tasks": [t[0] for t in tasks]}  # as Stage.run's: another one wipes the work dir
        results = encode_on_executor(cfg, tasks, num_proc, stage_identity)
    seconds = time.perf_counter() - start
    bad = BadRecords(max_ratio=cfg.corpus.max_bad_ratio)
    splits = _splits_meta(sources, results, clean, bad)
    bad.check(final=True)
    tok_fp = fingerprint(tok_dir)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.get_vocab_size(),
            "eos_token": eos_token, "eos_token_id": eos_id, "tokenizer_fingerprint": tok_fp, "splits": splits}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    n_tokens, n_bytes = sum(r["tokens"] for r in results), sum(r["bytes"] for r in results)
    counts = {"dtype": dtype.name, "vocab_size": meta["vocab_size"], "tokenizer_fingerprint": tok_fp,
              **{f"{s}_{k}": splits[s][k] for s in SPLITS for k in ("tokens", "documents")},
              "files": len(tasks), "num_proc": num_proc, "seconds": round(seconds, 2),
              "tokens_per_s": round(n_tokens / max(seconds, 1e-9)),
              "mb_per_s": round(n_bytes / 1e6 / max(seconds, 1e-9), 2),  # UTF-8 text encoded per second
              "input_mb": round(sum(Path(t[0]).stat().st_size for t in tasks) / 1e6, 2), "bad_records": bad.as_dict()}
    log.info("pretokenize: train %d tokens (%d documents), valid %d tokens (%d documents), %s, %d files with %d "
             "processes, %.2f Mtokens/s", splits["train"]["tokens"], splits["train"]["documents"],
             splits["valid"]["tokens"], splits["valid"]["documents"], dtype.name, len(tasks), num_proc,
             counts["tokens_per_s"] / 1e6)
    return counts


PRETOKENIZE = Stage(
    name="pretokenize", output="tokens", inputs=("clean", "tokenizer"), build=_build,
    keys=("tokenizer.eos_token", "corpus.max_bad_ratio"),
    extra_inputs=lambda cfg: {"format_version": str(FORMAT_VERSION)},
    help="encode clean/ into flat token shards tokens/{train,valid}/*.bin (on corpus.executor, resumable)")


def run_pretokenize(cfg: Config) -> dict[str, Any]:
    """Encode `paths.clean` into `paths.tokens`; skipped when its manifest already matches."""
    return PRETOKENIZE.run(cfg)
