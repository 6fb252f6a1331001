"""`pipeline`: every step in order, each skipping itself when its output is up to date.

The steps are declared once, in STEPS: the artifact stages (codeparrot/stage.py), then train and evaluate, which
keep their own bookkeeping under runs/ (as do humaneval and sft). evaluate and humaneval skip the latest checkpoint
only when their result records its weights' fingerprint: a run retrained to the same step (train.resume=none)
leaves another model under the same step-N name. The command line takes each command's help from the same
declarations.
Under `accelerate launch`, rank 0 runs the artifact stages while the other ranks wait; they then find every stage
up to date, and all ranks train together.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

from .artifacts import read_manifest
from .config import Config, ConfigError, accumulation_steps
from .corpus.export import EXPORT_LOCAL, run_export_local  # noqa: F401  (run_export_local: re-exported)
from .corpus.prepare import PREPARE
from .data.pretokenize import PRETOKENIZE
from .sft.data import SFT_DATA
from .stage import Stage
from .tokenizer import TRAIN_TOKENIZER

log = logging.getLogger(__name__)

# How long the other ranks wait for rank 0's data stages: cleaning a 50 GB export takes hours, far past the
# 30 minutes of a process group's default timeout, so the wait has a gloo group of its own.
DATA_STAGES_TIMEOUT = timedelta(days=2)


@dataclass(frozen=True)
class Step:
    """A step that writes no Stage artifact (train, evaluate): it runs on every rank."""

    name: str
    keys: tuple[str, ...]  # the config sections and keys it reads, for `--help`
    run: Callable[[Config], dict[str, Any]]
    help: str


def _train(cfg: Config) -> dict[str, Any]:
    from .train import run_train

    return run_train(cfg)


def _evaluate_latest(cfg: Config) -> dict[str, Any]:
    from .evaluate import run_evaluate_latest

    return run_evaluate_latest(cfg)


TRAIN = Step("train", ("model", "data", "train", "eval", "hub", "paths", "tokenizer.eos_token", "corpus.max_bad_ratio"),
             _train, "train the model (also under `accelerate launch -m codeparrot train`)")
EVALUATE = Step("evaluate", ("eval", "data", "train.mixed_precision", "train.seed", "paths", "tokenizer.eos_token",
                             "corpus.max_bad_ratio"),
                _evaluate_latest, "validation loss and perplexity of a checkpoint (in `pipeline`: the run's latest)")


def _humaneval_latest(cfg: Config) -> dict[str, Any]:
    from .humaneval import run_humaneval_latest

    return run_humaneval_latest(cfg)


HUMANEVAL = Step("humaneval", ("humaneval", "train.mixed_precision", "tokenizer.eos_token", "paths"), _humaneval_latest,
                 "pass@k on HumanEval, generated code sandboxed (in `pipeline`, when eval.humaneval: the latest "
                 "checkpoint)")


def _sft(cfg: Config) -> dict[str, Any]:
    from .sft.finetune import run_sft

    return run_sft(cfg)


SFT = Step("sft", ("sft", "train", "tokenizer.eos_token", "paths", "hub.endpoint"), _sft,
           "instruction-tune sft.base on sft/ (full or LoRA): final/ for transformers, responses.json, loss.png "
           "(also under `accelerate launch -m codeparrot sft`)")
STEPS: tuple[Stage | Step, ...] = (EXPORT_LOCAL, PREPARE, TRAIN_TOKENIZER, PRETOKENIZE, SFT_DATA, TRAIN, EVALUATE,
                                   HUMANEVAL, SFT)


def _exports(cfg: Config) -> bool:
    """Whether `pipeline` runs export-local for this config; never over an export that export-local did not make."""
    if cfg.paths.raw_url():  # read where it lies; export-local writes only local directories
        if cfg.corpus.source == "local":
            raise ConfigError(f"paths.raw={cfg.paths.raw} is a URL: set corpus.source=path (local exports this "
                              "machine's files into a local paths.raw)")
        return False
    raw = cfg.paths.resolve("raw")
    foreign = raw.exists() and (read_manifest(raw) or {}).get("stage") != EXPORT_LOCAL.name
    if cfg.corpus.source == "local" and foreign:
        log.info("pipeline: %s holds an export not made by export-local; using it as it is", raw)
        return False
    if cfg.corpus.source != "local" and not raw.exists():
        raise FileNotFoundError(f"paths.raw={raw} does not exist and corpus.source is {cfg.corpus.source!r}, "
                                "not 'local'")
    return cfg.corpus.source == "local"


def pipeline_steps(cfg: Config) -> list[Stage | Step]:
    """The steps `pipeline` runs for this config, in order."""
    skip = set()
    if not _exports(cfg):
        skip.add(EXPORT_LOCAL.name)
    if not cfg.data.pretokenized:  # train tokenizes clean/ on the fly instead of reading tokens/
        skip.add(PRETOKENIZE.name)
    if not cfg.eval.humaneval:
        skip.add(HUMANEVAL.name)
    if not cfg.sft.enabled:
        skip.update((SFT_DATA.name, SFT.name))
    return [step for step in STEPS if step.name not in skip]


@contextlib.contextmanager
def main_rank_first() -> Iterator[None]:
    """Under a multi-process launch, run the block on rank 0 while the other ranks wait, then on the others."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Joins the launch's process group, which training then reuses; `cpu` as Accelerator reads it, or a CPU launch
    # would look like one process here.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    group = dist.new_group(backend="gloo", timeout=DATA_STAGES_TIMEOUT)
    if not state.is_main_process:
        dist.barrier(group=group)
    yield
    if state.is_main_process:
        dist.barrier(group=group)


def run_pipeline(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run every step in order; each skips itself when its output is up to date."""
    steps = pipeline_steps(cfg)
    # A global batch that the launch cannot divide stops now, not after hours of data stages.
    accumulation_steps(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))
    results = {}
    with main_rank_first():  # the other ranks then find each stage up to date: they skip, never write
        for stage in (s for s in steps if isinstance(s, Stage)):
            log.info("pipeline: stage %s", stage.name)
            results[stage.name] = stage.run(cfg)
    for step in (s for s in steps if not isinstance(s, Stage)):  # train, evaluate, humaneval, sft: every rank
        log.info("pipeline: step %s", step.name)
        results[step.name] = step.run(cfg)
    return results
