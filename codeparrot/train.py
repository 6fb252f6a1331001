"""The `train` stage: an Accelerate loop with AdamW, cosine warmup, accumulation, eval, checkpoints and resume."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.optim.lr_scheduler import LambdaLR

from .artifacts import CheckpointError, fingerprint
from .config import Config, ConfigError, canonical_json
from .data.packing import make_dataloader
from .data.splits import split_dataset
from .data.tokens import check_tokenizer
from .evaluate import evaluate_loss
from .model import GPT, resolve_model_config, save_hf
from .tokenizer import TOKENIZER_FILE, load_tokenizer

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """What a checkpoint records about progress, beside the accelerate state."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    config_fingerprint: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # eval results so far


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str, min_ratio: float):
    """Multiplier of the base LR at a step: linear warmup, then cosine decay to `min_ratio` (or constant)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train.lr_schedule must be cosine or constant, got {schedule!r}")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def resolve_mixed_precision(setting: str) -> str:
    """'auto' means bf16 on a GPU that supports it, else fp32."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def run_dir(cfg: Config) -> Path:
    return cfg.paths.resolve("runs") / cfg.train.run_name


def latest_checkpoint(directory: Path) -> Path | None:
    """The highest complete `step-N` under a run (a `.tmp` save is never complete)."""
    if not directory.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return max(steps)[1] if steps else None


def read_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / TRAINER_STATE).read_text()))


def training_fingerprint(cfg: Config, inputs: dict[str, str]) -> str:
    """What must match for a resume or a skip: everything that shapes the run's numbers.

    Left out: the run's name and length (a longer max_steps recomputes the cosine for the new length from the
    resumed step on), I/O cadence, and speed switches that do not change the result.
    """
    train = {k: v for k, v in vars(cfg.train).items()
             if k not in ("run_name", "max_steps", "log_interval", "eval_interval", "save_interval", "keep_last",
                          "resume", "trackers", "peak_flops", "record_batch_digests", "compile", "fused_adamw",
                          "tf32")}
    data = {k: v for k, v in vars(cfg.data).items() if k != "pretokenize_num_proc"}  # shapes tokens/, not the run
    return canonical_json({"model": vars(cfg.model), "data": data, "train": train, "inputs": inputs})


def _trackers(names: list[str]) -> list[str]:
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"  # no login: keep the run on disk, sync it later with `wandb sync`
    return names


def _flat_config(cfg: Config) -> dict[str, Any]:
    """Scalars only, as TensorBoard's hparams want."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class Checkpointer:
    """Writes `step-N/` atomically (a `.tmp` name until complete), finds the latest, prunes old ones."""

    def __init__(self, accelerator: Accelerator, directory: Path, keep_last: int):
        self.accelerator, self.directory, self.keep_last = accelerator, directory, keep_last

    def save(self, step: int, model: torch.nn.Module, train_loader, state: TrainerState, cfg: Config,
             tokenizer_dir: Path, eos_token_id: int) -> Path:
        acc = self.accelerator
        final = self.directory / f"step-{step}"
        tmp = self.directory / f"step-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"))  # model, optimizer, scheduler, RNG of every process
        weights = acc.get_state_dict(model)  # gathers FSDP shards; a collective, so every rank calls it
        # Each rank's data position differs, so each writes its own file.
        torch.save(train_loader.state_dict(), tmp / f"data_state_rank{acc.process_index}.pt")
        if acc.is_main_process:
            save_hf(acc.unwrap_model(model), tmp, eos_token_id=eos_token_id, state_dict=weights)
            for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy2(tokenizer_dir / name, tmp / name)
            cfg.save(tmp / "config.yaml")
            # trainer_state.json last: its presence marks the checkpoint complete.
            (tmp / TRAINER_STATE).write_text(json.dumps(vars(state), indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(step)
        acc.wait_for_everyone()
        log.info("checkpoint: saved %s", final)
        return final

    def _prune(self, current: int) -> None:
        """Keep the newest `keep_last` checkpoints up to `current`; never touch later ones of an earlier run."""
        if self.keep_last <= 0:
            return
        steps = sorted((int(m.group(1)), p) for p in self.directory.iterdir()
                       if (m := STEP_DIR.match(p.name)) and int(m.group(1)) <= current)
        for _, path in steps[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def build_model_and_optimizer(cfg: Config, vocab_size: int, accelerator: Accelerator):
    """The GPT of `cfg` with AdamW and the warmup-cosine schedule, passed through `accelerator.prepare`."""
    t = cfg.train
    cuda = accelerator.device.type == "cuda"
    if cuda and t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (e.g. the optimizer's) on TF32
        torch.backends.cudnn.allow_tf32 = True
    model = GPT(resolve_model_config(cfg.model, vocab_size, cfg.data.seq_length))
    optimizer = torch.optim.AdamW(model.optimizer_groups(t.weight_decay), lr=t.learning_rate,
                                  betas=(t.adam_beta1, t.adam_beta2), fused=t.fused_adamw and cuda)
    scheduler = LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio))
    if t.compile if t.compile is not None else cuda:  # null: compile on GPUs, where it pays for its warm-up
        model = torch.compile(model)
    return accelerator.prepare(model, optimizer, scheduler)


class TrainStep:
    """One optimizer step over `accumulation` micro-batches; results stay on the device (no host sync)."""

    def __init__(self, model, optimizer, scheduler, accelerator: Accelerator, accumulation: int,
                 max_grad_norm: float):
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm

    def __call__(self, batches) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], float]:
        """Returns (summed micro-batch losses, grad norm, the batches used, seconds spent waiting for data)."""
        acc, model = self.accelerator, self.model
        loss_sum = torch.zeros((), device=acc.device)
        used, wait = [], 0.0
        grad_norm = torch.zeros((), device=acc.device)
        for _ in range(self.accumulation):
            wait_start = time.perf_counter()
            batch = next(batches).to(acc.device, non_blocking=True)  # [B, T]
            wait += time.perf_counter() - wait_start
            used.append(batch)
            with acc.accumulate(model):
                loss = model(batch, labels=batch).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        self.scheduler.step()
        return loss_sum, grad_norm, used, wait


def _write_rank_report(accelerator: Accelerator, model: torch.nn.Module, out: Path, first_batch: str,
                       step: int) -> None:
    """Per-rank facts (world size, a weight checksum, the first batch's digest): what shows DDP kept in sync."""
    with torch.no_grad():
        checksum = sum(p.detach().double().sum().item() for p in accelerator.unwrap_model(model).parameters())
    report = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
              "device": str(accelerator.device), "step": step, "param_checksum": checksum,
              "first_batch_sha1": first_batch}
    path = out / "logs" / f"rank{accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def run_train(cfg: Config) -> dict[str, Any]:
    """Train (or resume) the model of `cfg`; rank 0 returns a summary."""
    t = cfg.train
    for key in ("max_steps", "log_interval", "save_interval", "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    out = run_dir(cfg)
    tokenizer_dir = cfg.paths.resolve("tokenizer")
    inputs = {"clean": fingerprint(cfg.paths.resolve("clean")), "tokenizer": fingerprint(tokenizer_dir)}
    if cfg.data.pretokenized:  # the token shards are an input too, and must come from this very tokenizer
        check_tokenizer(cfg.paths.resolve("tokens"), inputs["tokenizer"])
        inputs["tokens"] = fingerprint(cfg.paths.resolve("tokens"))
    config_fp = training_fingerprint(cfg, inputs)

    resume_from: Path | None = None
    if t.resume == "auto":
        resume_from = latest_checkpoint(out)
    elif t.resume not in ("none", ""):
        resume_from = Path(t.resume)
        if not (resume_from / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"train.resume={t.resume} is not a complete checkpoint (no {TRAINER_STATE})")
    if resume_from is not None:
        prior = read_trainer_state(resume_from)
        if prior.config_fingerprint != config_fp:
            raise ValueError(f"cannot resume from {resume_from}: it was trained with another config or other "
                             f"inputs; use another train.run_name or train.resume=none")
        if prior.step >= t.max_steps:
            log.info("train: %s already reached step %d, skipping", resume_from, prior.step)
            return {"skipped": True, "checkpoint": str(resume_from), "step": prior.step,
                    "best_val_loss": prior.best_val_loss}

    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(t.mixed_precision),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=_trackers(t.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not processes x steps
    )
    set_seed(t.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokenizer = load_tokenizer(tokenizer_dir)
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    model, optimizer, scheduler = build_model_and_optimizer(cfg, tokenizer.get_vocab_size(), accelerator)
    gpt_cfg = accelerator.unwrap_model(model).config
    n_params = accelerator.unwrap_model(model).num_parameters()
    flops_per_token = accelerator.unwrap_model(model).flops_per_token(cfg.data.seq_length)

    # Our datasets shard themselves by (rank, worker), so their loaders are not passed through prepare().
    train_ds = split_dataset(cfg, "train", tokenizer, rank, world, infinite=True)
    pin = accelerator.device.type == "cuda"
    train_loader = make_dataloader(train_ds, t.micro_batch_size, cfg.data.num_workers, pin_memory=pin)
    valid_ds = split_dataset(cfg, "valid", tokenizer, rank, world, infinite=False) if t.eval_interval > 0 else None

    state = TrainerState(config_fingerprint=config_fp)
    if resume_from is not None:
        data_state = resume_from / f"data_state_rank{rank}.pt"
        if not data_state.is_file():
            raise FileNotFoundError(f"{data_state} missing: resume with the world size the checkpoint was saved with")
        try:
            accelerator.load_state(str(resume_from / "accelerate"))
            train_loader.load_state_dict(torch.load(data_state, weights_only=False))
        except Exception as e:  # torch, safetensors and pickle each raise their own kind on a damaged file
            raise CheckpointError(f"checkpoint {resume_from} is damaged ({type(e).__name__}: {e}); delete it to "
                                  f"resume from the one before, or set train.resume=none") from e
        state = read_trainer_state(resume_from)
        log.info("train: resumed from %s at step %d", resume_from, state.step)

    accelerator.init_trackers(t.run_name, config=_flat_config(cfg))
    checkpointer = Checkpointer(accelerator, out, t.keep_last)
    tokens_per_step = t.micro_batch_size * cfg.data.seq_length * t.gradient_accumulation_steps * world
    metrics_file = out / "logs" / "metrics.jsonl"
    if accelerator.is_main_process:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    log.info("train: %s, %.1fM params, %d process(es) on %s, %s precision, %d tokens/step, steps %d -> %d",
             gpt_cfg, n_params / 1e6, world, accelerator.device, accelerator.mixed_precision, tokens_per_step,
             state.step, t.max_steps)

    def record(metrics: dict[str, Any], step: int) -> None:
        accelerator.log(metrics, step=step)
        if accelerator.is_main_process:
            with metrics_file.open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def run_eval(step: int) -> dict[str, float]:
        valid_loader = make_dataloader(valid_ds, cfg.eval.batch_size, 0, pin_memory=pin)
        result = evaluate_loss(model, valid_loader, accelerator, cfg.eval.max_batches)
        state.best_val_loss = min(state.best_val_loss, result["loss"])
        state.history.append({"step": step, **result})
        record({"eval/loss": result["loss"], "eval/perplexity": result["perplexity"],
                "eval/tokens": result["tokens"]}, step)
        log.info("eval @ step %d: loss %.4f, perplexity %.2f over %d tokens", step, result["loss"],
                 result["perplexity"], result["tokens"])
        return result

    if state.step == 0 and t.eval_interval > 0:
        run_eval(0)
    model.train()
    data_iter = iter(train_loader)
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on device: no host sync inside the step
    step_fn = TrainStep(model, optimizer, scheduler, accelerator, t.gradient_accumulation_steps, t.max_grad_norm)
    window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
    last_saved = state.step
    train_start = time.perf_counter()
    start_step = state.step
    first_batch_digest = ""
    while state.step < t.max_steps:
        lr = scheduler.get_last_lr()[0]  # the rate this step trains with (read before the scheduler advances)
        step_loss, grad_norm, batches, wait = step_fn(data_iter)
        loss_sum += step_loss
        data_wait += wait
        if not first_batch_digest:
            first_batch_digest = hashlib.sha1(batches[0].cpu().numpy().tobytes()).hexdigest()[:16]
        state.step += 1
        state.tokens_seen += tokens_per_step
        if t.record_batch_digests:  # off by default: it copies the step's batches back to the host
            digest = hashlib.sha1()
            for b in batches:
                digest.update(b.cpu().numpy().tobytes())
            step_sha1 = digest.hexdigest()
            if world > 1:  # one digest per step over every rank's batches, in rank order
                from accelerate.utils import gather_object

                step_sha1 = hashlib.sha1("".join(gather_object([step_sha1])).encode()).hexdigest()
            if accelerator.is_main_process:
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps({"step": state.step, "data/batch_sha1": step_sha1}) + "\n")
        window_steps += 1

        # Also log at each save, so a resumed run's loss windows line up with an uninterrupted run's.
        if state.step % t.log_interval == 0 or state.step % t.save_interval == 0 or state.step == t.max_steps:
            mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / (
                window_steps * t.gradient_accumulation_steps)
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            record({"train/loss": mean_loss, "train/lr": lr,
                    "train/grad_norm": float(grad_norm), "train/tokens_seen": state.tokens_seen,
                    "train/tokens_per_s": tokens_per_s, "train/step_time_s": elapsed / window_steps,
                    "train/data_wait_frac": data_wait / elapsed,
                    "train/mfu": flops_per_token * tokens_per_s / (t.peak_flops * world)}, state.step)
            log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tokens/s, data wait %.0f%%", state.step, t.max_steps,
                     mean_loss, lr, tokens_per_s, 100 * data_wait / elapsed)
            loss_sum.zero_()
            window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        if t.eval_interval > 0 and (state.step % t.eval_interval == 0 or state.step == t.max_steps):
            run_eval(state.step)
            model.train()
        if state.step % t.save_interval == 0 or state.step == t.max_steps:
            checkpointer.save(state.step, model, train_loader, state, cfg, tokenizer_dir, eos_id)
            last_saved = state.step

    accelerator.end_training()
    seconds = time.perf_counter() - train_start
    _write_rank_report(accelerator, model, out, first_batch_digest, state.step)
    final = out / f"step-{last_saved}"
    return {"skipped": False, "checkpoint": str(final), "step": state.step, "params_m": round(n_params / 1e6, 2),
            "processes": world, "seconds": round(seconds, 1),
            "tokens_per_s": round((state.step - start_step) * tokens_per_step / max(seconds, 1e-9)),
            "first_val_loss": state.history[0]["loss"] if state.history else None,
            "best_val_loss": state.best_val_loss,
            "final_val_perplexity": state.history[-1]["perplexity"] if state.history else None}
