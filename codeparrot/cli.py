"""Command line: one subcommand per stage; each parses the config and calls the stage function."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .artifacts import CheckpointError
from .config import ConfigError, load_config
from .corpus.source import TooManyBadRecords
from .logs import setup_logging

log = logging.getLogger("codeparrot")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML file in configs/ (defaults apply when omitted)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    """The `codeparrot` argument parser."""
    parser = argparse.ArgumentParser(prog="codeparrot", description="Pretrain a GPT-2-style code model.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export-local", help="export the local Python installation as BigQuery-format shards")
    p.add_argument("out", help="output directory (raw/)")
    p.add_argument("--root", action="append", dest="roots", help="directory to walk (repeatable); "
                   "default: the interpreter's standard library, site-packages included")
    p.add_argument("--shard-records", type=int, default=2000, help="records per shard")
    p.add_argument("--max-files", type=int, default=0, help="stop after this many files (0: all)")

    for name, help_ in [("prepare", "filter, deduplicate, decontaminate and split the raw export into clean/"),
                        ("train-tokenizer", "train the byte-level BPE tokenizer on clean/train"),
                        ("pretokenize", "encode clean/ into flat token shards tokens/{train,valid}/*.bin"),
                        ("train", "train the model (also under `accelerate launch -m codeparrot train`)"),
                        ("pipeline", "run every stage in order, skipping finished ones")]:
        _add_config_args(sub.add_parser(name, help=help_))
    p = sub.add_parser("evaluate", help="validation loss and perplexity of a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a runs/<run>/step-<N> directory")
    return parser


def _summary(title: str, result: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, rank 0 speaks for all
        return
    print(f"== {title} ==")
    for key, value in result.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        if isinstance(value, str) and "\n" in value:  # code (prompt, completion): show it as a block
            print(f"  {key}:")
            print("\n".join("    | " + line for line in value.split("\n")))
            continue
        print(f"  {key}: {value}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `codeparrot` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "export-local":
            from .pipeline import run_export_local

            _summary("export-local", run_export_local(args.out, args.roots, args.shard_records, args.max_files))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "prepare":
            from .corpus.prepare import run_prepare

            _summary("prepare", run_prepare(cfg))
        elif args.command == "train-tokenizer":
            from .tokenizer import run_train_tokenizer

            _summary("train-tokenizer", run_train_tokenizer(cfg))
        elif args.command == "pretokenize":
            from .data.tokens import run_pretokenize

            _summary("pretokenize", run_pretokenize(cfg))
        elif args.command == "train":
            from .train import run_train

            _summary("train", run_train(cfg))
        elif args.command == "evaluate":
            from .evaluate import run_evaluate

            _summary("evaluate", run_evaluate(cfg, args.checkpoint))
        elif args.command == "pipeline":
            from .pipeline import run_pipeline

            for name, result in run_pipeline(cfg).items():
                _summary(name, result)
    except (ConfigError, TooManyBadRecords, FileNotFoundError, ValueError, CheckpointError) as e:
        # Expected failures (bad config or input, refused resume, damaged checkpoint) get a message, not a trace;
        # --log-level DEBUG shows the trace too.
        log.debug("traceback", exc_info=True)
        print(f"codeparrot {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
