"""Benchmark: the `train-tokenizer` stage against the raw `tokenizers` BPE trainer on the same input.

    python scripts/bench_tokenizer.py                      # work/tiny/clean, vocab 32768, 200k files
    python scripts/bench_tokenizer.py --vocab-size 8192 --n-examples 4000 --repeats 3

The raw trainer reads the first n_examples contents of clean/train from memory (loaded untimed);
the stage streams them from the gz shards, then reports chars/token on clean/valid and saves.
Runs alternate (raw, stage, raw, stage, ...) and the best time of each is reported.
Goal: the stage costs at most 10% more than the raw trainer.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from codeparrot.config import load_config
from codeparrot.corpus.source import BadRecords, list_shards, utf8_len
from codeparrot.tokenizer import BATCH_FILES, iter_contents, run_train_tokenizer

DEFAULT_CLEAN = "work/tiny/clean"
GOAL = 1.10  # stage time / raw time


def train_raw(texts: list[str], vocab_size: int, min_frequency: int, eos: str) -> float:
    """Seconds to train a byte-level BPE on in-memory texts with the bare library."""
    start = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    batches = (texts[i:i + BATCH_FILES] for i in range(0, len(texts), BATCH_FILES))
    tok.train_from_iterator(batches, trainer)
    return time.perf_counter() - start


def run_stage(clean: Path, out: Path, args: argparse.Namespace) -> tuple[float, dict]:
    """(total wall seconds, the stage's returned dict) for one fresh run of the stage."""
    cfg = load_config(None, [f"paths.clean={clean}", f"paths.tokenizer={out}",
                             f"tokenizer.vocab_size={args.vocab_size}", f"tokenizer.n_examples={args.n_examples}",
                             f"tokenizer.report_valid_files={args.report_valid_files}"])
    start = time.perf_counter()
    result = run_train_tokenizer(cfg)
    total = time.perf_counter() - start
    if result.get("skipped"):
        raise RuntimeError(f"stage skipped at {out}; expected a fresh run")
    return total, result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clean", default=DEFAULT_CLEAN, help="a prepared clean/ artifact")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--n-examples", type=int, default=200000)
    p.add_argument("--report-valid-files", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the stage writes (default: a temp dir)")
    args = p.parse_args()

    clean = Path(args.clean)
    if not (clean / "train").is_dir():
        sys.exit(f"no prepared corpus at {clean}/train. Run `codeparrot pipeline --config configs/tiny.yaml` "
                 f"or `codeparrot prepare --config C paths.clean={clean}` first, or pass --clean DIR.")
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("CI", "1")  # the stage then logs progress (silenced) instead of drawing a tqdm bar

    # Untimed: the same texts the stage will stream, in the same order.
    texts = list(iter_contents(list_shards(clean / "train"), args.n_examples, BadRecords()))
    mb = sum(utf8_len(t) for t in texts) / 1e6  # UTF-8 bytes, as the stage counts them
    defaults = load_config(None).tokenizer
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tokenizer_"))
    workdir.mkdir(parents=True, exist_ok=True)

    raw_s, total_s, train_s, stage = [], [], [], {}
    for i in range(args.repeats):
        raw_s.append(train_raw(texts, args.vocab_size, defaults.min_frequency, defaults.eos_token))
        total, stage = run_stage(clean, Path(tempfile.mkdtemp(prefix=f"tokenizer-{i}-", dir=workdir)), args)
        total_s.append(total)
        train_s.append(stage["train_seconds"])
        print(f"repeat {i + 1}/{args.repeats}: raw {raw_s[-1]:.2f}s, stage training {train_s[-1]:.2f}s, "
              f"stage total {total:.2f}s", flush=True)

    raw, train, total = min(raw_s), min(train_s), min(total_s)
    if abs(stage["train_mb"] - round(mb, 2)) > 0.01:
        print(f"WARNING: stage trained on {stage['train_mb']} MB, raw on {mb:.2f} MB")
    print(f"\n{len(texts):,} files, {mb:.2f} MB of text, vocab {args.vocab_size}, "
          f"best of {args.repeats}, outputs in {workdir}")
    rows = [("raw tokenizers trainer", raw, f"{mb / raw:.2f}", "1.00"),
            ("stage: training part", train, f"{mb / train:.2f}", f"{train / raw:.2f}"),
            ("stage: total (+report, save)", total, f"{mb / total:.2f}", f"{total / raw:.2f}")]
    print(f"{'':30} {'seconds':>9} {'MB/s':>8} {'x raw':>7}")
    for name, s, rate, ratio in rows:
        print(f"{name:30} {s:9.2f} {rate:>8} {ratio:>7}")
    # The stage's MB/s (report.json's train_mb_per_s) is its training part: streaming from gz + training.
    for what, seconds in (("stage training (its MB/s)", train), ("whole command (+valid report, save)", total)):
        verdict = "meets" if seconds / raw <= GOAL else "misses"
        print(f"{what}: {seconds / raw - 1:+.1%} vs raw; {verdict} the goal of at most +{GOAL - 1:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
