"""The `train` stage: an Accelerate loop with AdamW (or Muon), warmup + cosine (or WSD), accumulation, eval,
checkpoints and resume.

Read `run_train` first: it builds the pieces (builders below), then runs `train_step` until `train.max_steps`,
evaluating and saving on the way. Bookkeeping (checkpoints, resume, identity) is in runs.py, metrics in metrics.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed

from . import optim
from .artifacts import fingerprint
from .config import Config, ConfigError, TrainConfig, accumulation_steps
from .data.packing import make_dataloader
from .data.splits import split_dataset
from .data.pretokenize import check_tokenizer
from .divergence import SpikeGuard, TrainingDiverged, check_step, diverged_message, what_next
from .evaluate import evaluate_loss
from .hub import start_pusher
from .metrics import MetricsLogger
from .model import GPT, batch_inputs, count_real_tokens, count_targets, load_hf, resolve_model_config
from .runs import (Checkpointer, TrainerState, find_resume, latest_checkpoint, read_trainer_state,  # noqa: F401
                   resolve_mixed_precision, run_dir, training_fingerprint)
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


# --- builders -----------------------------------------------------------------------------------

def lr_lambda(warmup_steps: int, max_steps: int, schedule: str, min_ratio: float, decay_fraction: float = 0.2,
              decay_shape: str = "linear") -> Callable[[int], float]:
    """Multiplier of the base LR at a step: linear warmup, then cosine decay to `min_ratio`, constant, or WSD."""
    if schedule not in ("cosine", "constant", "wsd"):
        raise ValueError(f"train.lr_schedule must be wsd, cosine or constant, got {schedule!r}")
    if schedule == "wsd":
        return wsd_lambda(warmup_steps, max_steps, min_ratio, decay_fraction, decay_shape)

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def wsd_start(warmup_steps: int, max_steps: int, decay_fraction: float) -> int:
    """The 0-based step at which WSD's decay begins: the last `decay_fraction` of max_steps, never inside warmup."""
    return max(warmup_steps, max_steps - round(decay_fraction * max_steps))


def wsd_lambda(warmup_steps: int, max_steps: int, min_ratio: float, decay_fraction: float,
               decay_shape: str) -> Callable[[int], float]:
    """Warmup-stable-decay: linear warmup, 1.0 until `wsd_start`, then down to `min_ratio` at the last step."""
    if decay_shape not in ("linear", "sqrt"):
        raise ValueError(f"train.decay_shape must be linear or sqrt, got {decay_shape!r}")
    start = wsd_start(warmup_steps, max_steps, decay_fraction)

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < start:
            return 1.0
        # +1 as in warmup: every decay step trains below the peak and the run's last step at min_ratio, so the
        # steps before `start` are exactly those of a run that never decays (what a branched decay relies on)
        progress = min(1.0, (step - start + 1) / max(1, max_steps - start))
        remaining = 1 - (progress if decay_shape == "linear" else math.sqrt(progress))
        return min_ratio + (1 - min_ratio) * remaining

    return fn


def build_lr_schedule(t: TrainConfig) -> Callable[[int], float]:
    """The learning rate of the step with 0-based index `step`, for the schedule of the current config.

    Computed from the step alone (no scheduler state), so a resumed run that changed max_steps follows the
    new schedule from its first step on.
    """
    multiplier = lr_lambda(t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio, t.decay_fraction,
                           t.decay_shape)
    if t.lr_schedule == "wsd":
        start = wsd_start(t.warmup_steps, t.max_steps, t.decay_fraction)  # step-<start> is the last stable one
        log.info("train: wsd schedule: stable through step %d, then a %s decay over steps %d..%d", start,
                 t.decay_shape, start + 1, t.max_steps)
    return lambda step: t.learning_rate * multiplier(step)


def make_accelerator(cfg: Config, out: Path) -> Accelerator:
    """The Accelerator of a run: precision, trackers and logging dir (launch settings come from the environment)."""
    trackers = cfg.train.trackers
    if "wandb" in trackers:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.trackers names wandb, which is not installed: pip install 'codeparrot[wandb]'")
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")  # no login: keep the run on disk; `wandb sync` it later
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                       gradient_accumulation_steps=1,  # train_step scales by 1/G itself: never twice
                       log_with=trackers or None,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


def build_model(cfg: Config, vocab_size: int, accelerator: Accelerator, weights: Path | None = None) -> GPT:
    """The GPT of `cfg` (with the weights of checkpoint `weights` if given); under FSDP on the `meta` device, so no
    rank holds the whole model in host memory."""
    config = resolve_model_config(cfg.model, vocab_size, cfg.data.seq_length)
    if weights is not None:
        if accelerator.is_fsdp2:
            raise ValueError("starting from a checkpoint's weights is not supported under FSDP; resume exactly "
                             "(hub.include_training_state=true) or start on one process")
        source, model = load_hf(weights), GPT(config)
        src = source.config
        if src.arch != config.arch:
            raise ValueError(f"{weights} holds a {src.arch} model; this config's model.arch is {config.arch}: set "
                             f"model.arch={src.arch} to start from it")
        shape = lambda c: (c.vocab_size, c.n_positions, c.n_layer, c.n_head, c.n_embd)  # noqa: E731
        if shape(src) != shape(config):
            raise ValueError(f"{weights} holds a model of shape {shape(src)} (vocab, positions, layers, "
                             f"heads, width); this config's is {shape(config)}")
        keys = {"n_kv_head": "n_kv_head", "intermediate_size": "intermediate_size", "qk_norm": "qk_norm",
                "tie_embeddings": "tie_embeddings", "padded_vocab_size": "vocab_pad_multiple (padded vocab)"}
        differ = [f"model.{name}: {getattr(src, k)} there, {getattr(config, k)} here" for k, name in keys.items()
                  if getattr(src, k) != getattr(config, k)]
        if differ:
            raise ValueError(f"{weights} holds a {src.arch} model unlike this config's ({'; '.join(differ)})")
        model.load_state_dict(source.state_dict())
        log.info("train: starting from the weights of %s", weights)
        return model
    if accelerator.is_fsdp2:
        with torch.device("meta"):
            return GPT(config)  # materialised shard by shard in prepare_model
    return GPT(config)


def build_optimizer(model: GPT, t: TrainConfig, accelerator: Accelerator) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW (`train.optimizer`; see optim.py); AdamW fused on CUDA."""
    return optim.build_optimizer(model, t, fused_adamw=t.fused_adamw and accelerator.device.type == "cuda",
                                 fsdp=accelerator.distributed_type == DistributedType.FSDP)


def prepare_model(model: GPT, optimizer: torch.optim.Optimizer, t: TrainConfig, accelerator: Accelerator):
    """Wrap for the launch (DDP, FSDP2 or none), materialise a meta model, then compile each block."""
    cuda = accelerator.device.type == "cuda"
    if cuda and t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (e.g. the optimizer's) on TF32
        torch.backends.cudnn.allow_tf32 = True
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    model, optimizer = accelerator.prepare(model, optimizer)
    gpt = accelerator.unwrap_model(model)
    if any(p.is_meta for p in gpt.parameters()):  # FSDP2 sharded it on meta: give each rank its shard, then init
        gpt.to_empty(device=accelerator.device)
        gpt.init_weights()
        # accelerate maps the optimizer's parameters to the sharded ones by storage address, which every meta
        # tensor shares (0), so it would hand the optimizer one parameter many times: rebind them by name.
        sharded = dict(gpt.named_parameters())
        for group, names_in_group in zip(optimizer.param_groups, group_names):
            group["params"] = [sharded[name] for name in names_in_group]
        log.info("train: built on meta, sharded, then initialised shard by shard on %s", accelerator.device)
    if t.compile if t.compile is not None else cuda:  # null: compile on GPUs, where it pays for its warm-up
        # After prepare, per block and in place (as torchtitan compiles per block): DDP's all-reduce hooks and
        # FSDP2's all-gather hooks stay outside the compiled graphs, so communication still overlaps with
        # compute; the blocks share one compiled graph; and parameter names (checkpoints) do not change.
        for block in gpt.h:
            block.compile()
    return model, optimizer


def build_dataloaders(cfg: Config, tokenizer, accelerator: Accelerator, micro_batch_size: int):
    """The infinite train loader and the finite valid dataset of this rank (they shard themselves)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    # Our datasets shard by (rank, worker), so their loaders are not passed through accelerator.prepare().
    train = split_dataset(cfg, "train", tokenizer, rank, world, infinite=True)
    loader = make_dataloader(train, micro_batch_size, cfg.data.num_workers,
                             pin_memory=accelerator.device.type == "cuda")
    valid = split_dataset(cfg, "valid", tokenizer, rank, world, infinite=False) if cfg.train.eval_interval else None
    return loader, valid


# --- one optimizer step -------------------------------------------------------------------------

class StepResult(NamedTuple):
    """What one optimizer step leaves, still on the device (reading it would force a host sync)."""

    loss: torch.Tensor  # the step's loss: its micro-batches' losses weighted by their target tokens
    grad_norm: torch.Tensor  # before clipping
    batches: list[dict[str, torch.Tensor]]  # the micro-batches it trained on (batch_inputs of each)
    data_wait: float  # seconds spent waiting for batches
    tokens: Optional[torch.Tensor]  # input tokens of the step over every rank; None: fixed-size blocks


def micro_weights(micro: list[dict[str, torch.Tensor]], accelerator: Accelerator
                  ) -> tuple[list[float] | torch.Tensor, Optional[torch.Tensor]]:
    """Each micro-batch's share of the step's loss, and the step's real (non-padding) input tokens over every rank.

    The share is its target tokens over the step's, across micro-batches and ranks, so that accumulation and the
    process count never change the result (a per-micro-batch mean would). DDP averages gradients over ranks, hence
    the factor world size. Pretraining blocks all hold B * (T - 1) targets: their share is 1/G, with no count.
    """
    G = len(micro)
    if all("targets" not in m for m in micro):
        return [1.0 / G] * G, None
    counts = torch.stack([count_targets(m) for m in micro]).float()  # [G]
    tokens = torch.stack([count_real_tokens(m) for m in micro]).float().sum()  # padding left out
    totals = accelerator.reduce(torch.stack([counts.sum(), tokens]), reduction="sum")
    if totals[0].item() == 0:  # a host sync per step, which fine-tuning batches can afford
        raise ValueError("a training step has no target token on any rank: every row was masked (mask_prompt with "
                         "prompts longer than allowed_max_length?)")
    return counts * accelerator.num_processes / totals[0], totals[1]


def train_step(model, optimizer, batches: Iterator, accelerator: Accelerator, accumulation: int,
               max_grad_norm: float, lr: float,
               approve: Optional[Callable[[torch.Tensor, torch.Tensor], bool]] = None,
               z_loss: float = 0.0) -> StepResult:
    """One optimizer step over `accumulation` micro-batches, at learning rate `lr` (times each group's `lr_ratio`,
    e.g. Muon's); `approve(loss, grad_norm)` may skip the update (False) or stop the run (raise) first; `z_loss` > 0
    adds that multiple of the mean log(Z)^2 to the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    extra = {"z_loss": z_loss} if z_loss > 0 else {}  # off: the forward is called exactly as before
    start = time.perf_counter()
    # every micro-batch first: their target counts weight each one's loss
    micro = [batch_inputs(next(batches), accelerator.device) for _ in range(accumulation)]
    wait = time.perf_counter() - start
    weights, tokens = micro_weights(micro, accelerator)
    step_loss = torch.zeros((), device=accelerator.device)
    for i, inputs in enumerate(micro):
        # Gradients are synchronised across ranks only after the last micro-batch; before it they add up locally.
        last = i == accumulation - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = model(**inputs, **extra).loss * weights[i]
            accelerator.backward(loss)
        step_loss += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    if approve is None or approve(step_loss, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, grad_norm, micro, wait, tokens)


# --- the loop -----------------------------------------------------------------------------------

def _check_intervals(t: TrainConfig) -> None:
    for key in ("max_steps", "log_interval", "save_interval", "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")


def _inputs(cfg: Config) -> dict[str, str]:
    """Fingerprints of the artifacts a run reads; token shards must come from this very tokenizer."""
    inputs = {"clean": fingerprint(cfg.paths.resolve("clean")), "tokenizer": fingerprint(cfg.paths.resolve("tokenizer"))}
    if cfg.data.pretokenized:
        check_tokenizer(cfg.paths.resolve("tokens"), inputs["tokenizer"])
        inputs["tokens"] = fingerprint(cfg.paths.resolve("tokens"))
    return inputs


def _batch_digest(batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> str:
    """One sha1 over the step's token ids of every rank, in rank order (copies the batches to the host)."""
    digest = hashlib.sha1()
    for b in batches:
        digest.update(b["input_ids"].cpu().numpy().tobytes())
    if accelerator.num_processes == 1:
        return digest.hexdigest()
    return hashlib.sha1("".join(gather_object([digest.hexdigest()])).encode()).hexdigest()


def _write_rank_report(accelerator: Accelerator, model, out: Path, first_batch: str, step: int) -> None:
    """Per-rank facts (world size, a weight checksum, the first batch's digest): what shows DDP kept in sync."""
    with torch.no_grad():
        checksum = sum(p.detach().double().sum().item() for p in accelerator.unwrap_model(model).parameters())
    report = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
              "distributed_type": accelerator.distributed_type.value, "mixed_precision": accelerator.mixed_precision,
              "device": str(accelerator.device), "step": step, "param_checksum": checksum,
              "first_batch_sha1": first_batch}
    path = out / "logs" / f"rank{accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _flat_config(cfg: Config) -> dict[str, Any]:
    """Scalars only, as TensorBoard's hparams want."""
    return {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


def _code_probe(cfg: Config, tokenizer, acc: Accelerator, out: Path):
    """eval.code_benchmark's probe (pass@1 at each evaluation), or None when off or the run never evaluates."""
    if not cfg.eval.code_benchmark or not cfg.train.eval_interval:
        return None
    from .humaneval.probe import CodeBenchmarkProbe  # the evaluation stage's scoring, run inside the loop

    return CodeBenchmarkProbe(cfg, tokenizer, acc, out)


class _Evaluator:
    """Validation loss and perplexity at a step (and eval.code_benchmark's pass@1), recorded in the trainer state
    and the metrics."""

    def __init__(self, cfg: Config, model, valid_ds, accelerator: Accelerator, metrics: MetricsLogger,
                 code_probe=None):
        self.cfg, self.model, self.valid_ds, self.acc, self.metrics = cfg, model, valid_ds, accelerator, metrics
        self.code_probe = code_probe

    def __call__(self, step: int, state: TrainerState) -> None:
        loader = make_dataloader(self.valid_ds, self.cfg.eval.batch_size, 0,
                                 pin_memory=self.acc.device.type == "cuda")
        result = evaluate_loss(self.model, loader, self.acc, self.cfg.eval.max_batches)
        passes = self.code_probe(self.model, step) if self.code_probe is not None else {}
        state.best_val_loss = min(state.best_val_loss, result["loss"])
        state.history.append({"step": step, **result, **passes})
        self.metrics.record({"eval/loss": result["loss"], "eval/perplexity": result["perplexity"],
                             "eval/tokens": result["tokens"], **{f"eval/{k}": v for k, v in passes.items()}}, step)
        log.info("eval @ step %d: loss %.4f, perplexity %.2f over %d tokens%s", step, result["loss"],
                 result["perplexity"], result["tokens"], "".join(f", {k} {v:.4f}" for k, v in passes.items()))
        self.model.train()


def _plot_losses(acc: Accelerator, out: Path) -> None:
    """loss.png beside the run (main process); a plot that fails is logged, never a failed run."""
    if not acc.is_main_process:
        return
    try:
        from .plots import plot_run

        plot_run(out)
    except Exception as e:  # matplotlib missing or a font problem must not cost a finished training run
        log.warning("train: no loss.png (%s: %s)", type(e).__name__, e)


@dataclass
class Loop:
    """The prepared pieces of one training run, pretraining or fine-tuning: `fit` runs them the same way."""

    cfg: Config  # its train section drives the loop (fine-tuning derives one from sft.*)
    accelerator: Accelerator
    model: Any  # as prepared (DDP, FSDP2 or plain)
    optimizer: torch.optim.Optimizer
    train_loader: Any  # infinite, with state_dict()/load_state_dict(); yields token blocks or collated dicts
    checkpointer: Checkpointer
    metrics: MetricsLogger
    state: TrainerState
    tokenizer_dir: Path  # copied into every checkpoint
    eos_id: int
    accumulation: int
    tokens_per_step: int  # of fixed-size blocks; batches that carry targets count their own
    evaluate: Optional[Callable[[int, TrainerState], None]] = None  # at step 0, every eval_interval, at the end
    after_step: Optional[Callable[[int, TrainerState], None]] = None  # e.g. fine-tuning's epoch-end sample
    section: str = "train"  # the config section a user edits for this loop's settings (errors name its keys)


def step_approver(loop: Loop) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """The check before each optimizer step: stop on a non-finite loss or grad norm (any rank), skip a spike."""
    t, acc, state = loop.cfg.train, loop.accelerator, loop.state
    guard = SpikeGuard(t.spike_sigma if t.skip_spikes else 0.0, t.spike_window)
    guard.load_state_dict(state.spikes)

    def approve(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        check = check_step(loss, grad_norm, acc.process_index, acc.num_processes, acc.reduce)
        if not check.finite:
            last = latest_checkpoint(loop.checkpointer.directory)
            raise TrainingDiverged(diverged_message(state.step + 1, check, str(last or ""), loop.section))
        why = guard.spike(check.loss, check.grad_norm)
        if why:
            guard.skipped += 1
            log.warning("train: step %d skipped (%s); %d skipped so far", state.step + 1, why, guard.skipped)
            loop.metrics.record({"train/skipped_steps": guard.skipped}, state.step + 1)
        else:
            guard.record(check.loss, check.grad_norm)
        state.spikes = guard.state_dict()
        return not why

    return approve


def _check_eval(loop: Loop) -> None:
    """A non-finite validation loss stops the run before that step's checkpoint could become the latest."""
    result = loop.state.history[-1] if loop.state.history else {}
    if "loss" in result and not math.isfinite(result["loss"]):
        last = latest_checkpoint(loop.checkpointer.directory)
        raise TrainingDiverged(f"evaluation at step {result['step']} gave loss {result['loss']}; stopped before "
                               f"saving it; {what_next(str(last or ''), loop.section)}")


def fit(loop: Loop) -> dict[str, Any]:
    """Run optimizer steps from loop.state.step to train.max_steps, evaluating and saving on the way."""
    t, acc, state, metrics = loop.cfg.train, loop.accelerator, loop.state, loop.metrics
    lr_at = build_lr_schedule(t)
    if state.step == 0 and loop.evaluate is not None:
        with metrics.paused():
            loop.evaluate(0, state)
    loop.model.train()
    batches, start_step, first_digest = iter(loop.train_loader), state.step, ""
    approve = step_approver(loop)
    start = time.perf_counter()
    while state.step < t.max_steps:
        lr = lr_at(state.step)
        result = train_step(loop.model, loop.optimizer, batches, acc, loop.accumulation, t.max_grad_norm, lr,
                            approve, t.z_loss)
        state.step += 1
        tokens = loop.tokens_per_step if result.tokens is None else int(result.tokens)
        state.tokens_seen += tokens
        metrics.add_step(result.loss, result.data_wait, tokens)
        if not first_digest:
            first_digest = hashlib.sha1(result.batches[0]["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
        if t.record_batch_digests:  # off by default: it copies the step's batches back to the host
            metrics.record({"data/batch_sha1": _batch_digest(result.batches, acc)}, state.step)
        end, save = state.step == t.max_steps, state.step % t.save_interval == 0
        # Also log at each save, so a resumed run's loss windows line up with an uninterrupted run's.
        if state.step % t.log_interval == 0 or save or end:
            metrics.flush(state.step, t.max_steps, lr, result.grad_norm, state.tokens_seen)
        do_eval = loop.evaluate is not None and (state.step % t.eval_interval == 0 or end)
        if do_eval or save or end or loop.after_step is not None:
            with metrics.paused():  # left out of the throughput window
                if do_eval:
                    loop.evaluate(state.step, state)
                    _check_eval(loop)
                if loop.after_step is not None:
                    loop.after_step(state.step, state)
                if save or end:
                    loop.checkpointer.save(state.step, loop.model, loop.train_loader, state, loop.cfg,
                                           loop.tokenizer_dir, loop.eos_id, last=end)
    for tracker in acc.trackers:  # not end_training(): it ends the process group, which evaluate still uses
        tracker.finish()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "start_step": start_step, "first_digest": first_digest,
            "hub": loop.checkpointer.finish_pushes(state.step)}  # waits for the last push


def run_train(cfg: Config) -> dict[str, Any]:
    """Train (or resume) the model of `cfg`; rank 0 returns a summary."""
    t = cfg.train
    _check_intervals(t)
    out, tokenizer_dir = run_dir(cfg), cfg.paths.resolve("tokenizer")
    config_fp = training_fingerprint(cfg, _inputs(cfg))
    resume_from, prior = find_resume(cfg, out, config_fp)
    # (checkpoint, no state): a new run that starts from that checkpoint's weights
    init_weights, resume_from = (resume_from, None) if prior is None else (None, resume_from)
    if prior is not None and prior.step >= t.max_steps:
        log.info("train: %s already reached step %d, skipping", resume_from, prior.step)
        return {"skipped": True, "checkpoint": str(resume_from), "step": prior.step,
                "best_val_loss": prior.best_val_loss}

    acc = make_accelerator(cfg, out)
    set_seed(t.seed)
    accumulation = accumulation_steps(t, acc.num_processes)
    tokenizer = load_tokenizer(tokenizer_dir)
    code_probe = _code_probe(cfg, tokenizer, acc, out)  # its sandbox self-test runs before anything is built
    model = build_model(cfg, tokenizer.get_vocab_size(), acc, init_weights)
    model, optimizer = prepare_model(model, build_optimizer(model, t, acc), t, acc)
    gpt = acc.unwrap_model(model)
    train_loader, valid_ds = build_dataloaders(cfg, tokenizer, acc, t.micro_batch_size)
    checkpointer = Checkpointer(acc, out, t.keep_last, start_pusher(cfg, acc))
    state = checkpointer.restore(resume_from, train_loader) if resume_from else TrainerState(config_fingerprint=config_fp)

    tokens_per_step = t.micro_batch_size * cfg.data.seq_length * accumulation * acc.num_processes
    metrics = MetricsLogger(acc, out / "logs" / "metrics.jsonl", tokens_per_step,
                            gpt.flops_per_token(cfg.data.seq_length), t.peak_flops)
    acc.init_trackers(t.run_name, config=_flat_config(cfg))
    if acc.is_main_process:
        cfg.save(out / "config.yaml")
    log.info("train: %s, %.1fM params, %d process(es) on %s, mixed precision %s, accumulation %d, %d tokens/step, "
             "steps %d -> %d", gpt.config, gpt.num_parameters() / 1e6, acc.num_processes, acc.device,
             acc.mixed_precision, accumulation, tokens_per_step, state.step, t.max_steps)
    evaluate = _Evaluator(cfg, model, valid_ds, acc, metrics, code_probe) if valid_ds is not None else None
    done = fit(Loop(cfg, acc, model, optimizer, train_loader, checkpointer, metrics, state, tokenizer_dir,
                    tokenizer.token_to_id(cfg.tokenizer.eos_token), accumulation, tokens_per_step, evaluate))
    _plot_losses(acc, out)
    _write_rank_report(acc, model, out, done["first_digest"], state.step)
    seconds = done["seconds"]
    return {"skipped": False, "checkpoint": str(out / f"step-{state.step}"), "step": state.step,
            "params_m": round(gpt.num_parameters() / 1e6, 2), "processes": acc.num_processes,
            "seconds": round(seconds, 1),
            "tokens_per_s": round((state.step - done["start_step"]) * tokens_per_step / max(seconds, 1e-9)),
            "first_val_loss": state.history[0]["loss"] if state.history else None,
            "best_val_loss": state.best_val_loss,
            "final_val_perplexity": state.history[-1]["perplexity"] if state.history else None, **done["hub"]}
