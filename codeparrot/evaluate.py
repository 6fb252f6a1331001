"""The `evaluate` stage: validation loss and perplexity of a checkpoint, across processes, plus a sample."""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .config import Config
from .data.transforms import SpecialIds
from .generate import encode_prompt, load_checkpoint
from .sampler import SamplingConfig, sample
from .results import (FINGERPRINT, checkpoint_fingerprint, move_aside, result_for, same_weights,
                      validation_settings, write_json)
from .model import batch_inputs, count_targets, model_device
from .runs import require_latest_checkpoint, resolve_mixed_precision

log = logging.getLogger(__name__)


def perplexity(loss: float) -> float:
    """exp(loss), or inf when that overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def unscored_targets(block: torch.Tensor, unscored: torch.Tensor) -> dict[str, torch.Tensor]:
    """A token block [B, T] as inputs whose aligned targets [B, T] leave out the ids in `unscored` (and the last
    position, which has no next token)."""
    targets = torch.full_like(block, -100)
    targets[:, :-1] = block[:, 1:].masked_fill(torch.isin(block[:, 1:], unscored), -100)
    return {"input_ids": block, "targets": targets}


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable, accelerator, max_batches: int = 0,
                  lockstep: bool = True, unscored: Sequence[int] = ()) -> dict[str, Any]:
    """Mean next-token loss over every evaluated target token of every process, and its perplexity.

    Batches are token blocks [B, T] (pretraining) or fine-tuning's collated dicts (see model.batch_inputs).
    Ranks may hold different amounts of validation data; in lockstep all stop together at the first batch some
    rank lacks, because a sharded (FSDP) forward needs every rank to take part. Without it (a model every rank
    holds whole) each rank evaluates all of its batches. Predictions of the ids in `unscored` (the quality tokens,
    when measuring conditioning) are not scored.
    """
    model.eval()
    device = model_device(model)  # batches go where the model is
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.float64, device=device)
    it = iter(batches)
    n = 0
    while max_batches <= 0 or n < max_batches:
        batch = next(it, None)
        if accelerator.num_processes > 1 and lockstep:
            have = torch.tensor(0.0 if batch is None else 1.0, device=device)
            if accelerator.reduce(have, reduction="sum").item() < accelerator.num_processes:
                break
        elif batch is None:
            break
        inputs = batch_inputs(batch, device)
        if len(unscored) and "targets" not in inputs:
            inputs = unscored_targets(inputs["input_ids"], torch.tensor(list(unscored), device=device))
        with accelerator.autocast():
            loss = model(**inputs).loss  # mean over the batch's target tokens
        count = count_targets(inputs)
        loss_sum += loss.double() * count
        n_tokens += count
        n += 1
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    n_tokens = accelerator.reduce(n_tokens, reduction="sum")
    if n_tokens.item() == 0:
        raise ValueError("no validation tokens: clean/valid is empty or shorter than one sequence per process")
    loss = (loss_sum / n_tokens).item()
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(n_tokens.item())}


def complete(model, tokenizer, prompt: str, max_new_tokens: int, eos_id: int | None) -> str:
    """Greedy completion of `prompt` (after EOS, as a file starts), decoded; at most what the context has room for."""
    ids = encode_prompt(tokenizer, prompt, eos_id)
    room = model.config.n_positions - len(ids)
    if room < 1:  # a sample shown after evaluation is no reason to fail the evaluation
        log.warning("evaluate: eval.prompt (%d tokens) fills the context (%d); no completion", len(ids),
                    model.config.n_positions)
        return ""
    cfg = SamplingConfig(n=1, max_new_tokens=min(max_new_tokens, room), temperature=0.0, eos_id=eos_id)
    return sample(model, [ids], cfg, functools.partial(tokenizer.decode, skip_special_tokens=False))[0][0].text


def quality_ids(cfg: Config, tokenizer) -> list[int]:
    """The quality tokens' ids when measuring conditioning (eval.quality_bucket/quality_token): the loss of a file
    under a token, not of guessing the token, which a forced wrong one would make dearer."""
    if not (cfg.eval.quality_bucket or cfg.eval.quality_token):
        return []
    return list(SpecialIds.from_tokenizer(tokenizer).quality)


def eval_suffix(cfg: Config) -> str:
    """The result file's suffix for an evaluation of one quality bucket or under one bucket's token ("" for all)."""
    parts = [f"{name}-{value}" for name, value in (("quality", cfg.eval.quality_bucket),
                                                   ("token", cfg.eval.quality_token)) if value]
    return "".join("." + p for p in parts)


def result_path(cfg: Config, checkpoint: Path) -> Path:
    """runs/<run>/eval/step-N[.quality-<b>][.token-<t>].json"""
    return checkpoint.parent / "eval" / f"{checkpoint.name}{eval_suffix(cfg)}.json"


def write_result(out: Path, result: dict[str, Any]) -> None:
    """Write an evaluation; one of other weights found there (a retrain under the same name) is moved aside."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and not same_weights(json.loads(out.read_text()).get(FINGERPRINT), result[FINGERPRINT]):
        move_aside(out, "holds the evaluation of other weights (retrained under the same name?)", log)
    write_json(out, result)


def run_evaluate(cfg: Config, checkpoint: str | Path, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a `step-N` checkpoint on the valid split; write `runs/<run>/eval/step-N.json` with the checkpoint's
    fingerprint (`fingerprint`: when the caller has it)."""
    from accelerate import Accelerator

    from .data.packing import make_dataloader
    from .data.splits import split_dataset

    ckpt = Path(checkpoint)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision))
    model, tokenizer = load_checkpoint(ckpt, accelerator.device)
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    dataset = split_dataset(cfg, "valid", tokenizer, accelerator.process_index, accelerator.num_processes,
                            infinite=False, seq_length=min(cfg.data.seq_length, model.config.n_positions))
    start = time.perf_counter()
    result = evaluate_loss(model, make_dataloader(dataset, cfg.eval.batch_size, 0), accelerator,
                           cfg.eval.max_batches, unscored=quality_ids(cfg, tokenizer))
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["checkpoint"] = str(ckpt)
    if cfg.eval.prompt:
        result["prompt"] = cfg.eval.prompt
        result["completion"] = complete(model, tokenizer, cfg.eval.prompt, cfg.eval.max_new_tokens, eos_id)
    for key in ("quality_bucket", "quality_token"):  # the conditioning measurement names what it measured
        if getattr(cfg.eval, key):
            result[key] = getattr(cfg.eval, key)
    result["settings"] = validation_settings(cfg, ckpt, accelerator.num_processes)  # what `compare` checks
    if accelerator.is_main_process:
        result[FINGERPRINT] = fingerprint or checkpoint_fingerprint(ckpt)
        out = result_path(cfg, ckpt)
        write_result(out, result)
        result["written"] = str(out)
    log.info("evaluate %s: loss %.4f, perplexity %.2f over %d tokens", ckpt, result["loss"], result["perplexity"],
             result["tokens"])
    return result


def run_evaluate_latest(cfg: Config) -> dict[str, Any]:
    """Evaluate the run's latest checkpoint (the pipeline's step after train); skipped when its weights, as they
    are now, were already evaluated (a retrain under the same step-N is evaluated again)."""
    ckpt = require_latest_checkpoint(cfg)
    old, fingerprint = result_for(result_path(cfg, ckpt), ckpt)
    if old is not None:
        log.info("evaluate: %s already evaluated, skipping", ckpt)
        return {"skipped": True, **old}
    return run_evaluate(cfg, ckpt, fingerprint)
