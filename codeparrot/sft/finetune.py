"""The `sft` stage: instruction fine-tuning of a pretrained model on `sft/`, on the training core (train.fit).

Read `run_sft`: it resolves the base model, encodes the records into examples (collate.py), derives the loop's
train section from sft.* (the chapter's recipe), and hands the pieces to `train.fit`, the same loop, checkpoints,
exact resume, metrics and trackers as pretraining. At the end it writes `final/` (merged, loadable by
transformers), the adapter alone for LoRA, `responses.json` for the test split and `loss.png`.
"""
from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from safetensors.torch import save_file

from ..artifacts import fingerprint, staged_dir
from ..config import Config, ConfigError, canonical_json, identity
from ..evaluate import evaluate_loss
from ..hub import HUB_PREFIX
from ..metrics import MetricsLogger
from ..model import load_hf
from ..runs import (Checkpointer, TrainerState, fetch_on_main_first, find_resume, require_latest_checkpoint,
                    write_model_dir)
from ..tokenizer import load_tokenizer
from ..train import Loop, build_optimizer, fit, make_accelerator, prepare_model
from .collate import has_targets, make_example, pack_rows
from .format import encode_record
from .lora import adapter_state, apply_lora, merge_lora, merged_weights
from .loader import EpochBatches, ordered_batches, row_collate
from .responses import ResponseWriter, score_test_split

log = logging.getLogger(__name__)

# train.* keys the fine-tuning loop takes as they are: the rest of its train section comes from sft.*
SHARED_TRAIN_KEYS = ("train.seed", "train.adam_beta1", "train.adam_beta2", "train.max_grad_norm",
                     "train.mixed_precision")


def resolve_base(cfg: Config) -> Path:
    """The directory of sft.base: the pretraining run's latest checkpoint, a step-N or transformers directory, or a
    `hub:` checkpoint fetched under runs/hub/."""
    base = cfg.sft.base
    if base == "latest":
        path = require_latest_checkpoint(cfg)
    elif base.startswith(HUB_PREFIX):
        path = fetch_on_main_first(base, cfg, cfg.paths.resolve("runs") / "hub")
    else:
        path = Path(base)
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"sft.base={base}: {path} lacks {', '.join(missing)} (a GPT-2 in transformers' "
                                "format saved with safetensors and its fast tokenizer, or a step-N checkpoint)")
    return path


def encode_split(path: Path, tokenizer, eos_id: int, max_len: int, mask_prompt: bool) -> tuple[list[dict], list, int]:
    """A split's records, their examples (the ones truncation left targets), and how many were dropped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `codeparrot sft-data` first")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = [make_example(*encode_record(r, tokenizer), eos_id, max_len, mask_prompt) for r in records]
    kept = [e for e in examples if has_targets(e)]
    return records, kept, len(examples) - len(kept)


def make_rows(examples: list, packing: bool, max_len: int, seed: int) -> list[list]:
    """Rows of examples: one each, or packed once in a seeded order (rows are then reshuffled every epoch)."""
    if not packing:
        return [[e] for e in examples]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    groups = pack_rows([len(examples[i][0]) for i in order], max_len)
    return [[examples[order[j]] for j in group] for group in groups]


def derive_train_config(cfg: Config, steps_per_epoch: int) -> Config:
    """The config the loop runs under: its train section from sft.* (train.* keeps only the shared switches)."""
    s, out = cfg.sft, copy.deepcopy(cfg)
    t, lora = out.train, s.method == "lora"
    t.run_name, t.micro_batch_size = s.run_name, s.batch_size
    t.gradient_accumulation_steps, t.global_batch_size = s.gradient_accumulation_steps, None
    t.learning_rate = s.learning_rate if s.learning_rate is not None else (2e-4 if lora else 5e-5)
    t.weight_decay, t.lr_schedule, t.min_lr_ratio = s.weight_decay, s.lr_schedule, 0.0
    t.max_steps = s.max_steps if s.max_steps > 0 else s.epochs * steps_per_epoch
    warmup = s.warmup_ratio if s.warmup_ratio is not None else (0.1 if lora else 0.0)
    t.warmup_steps = max(1, round(warmup * t.max_steps)) if warmup > 0 else 0
    t.eval_interval = t.log_interval = s.eval_interval
    t.save_interval = s.save_interval if s.save_interval > 0 else steps_per_epoch
    for key in ("max_steps", "eval_interval", "batch_size", "gradient_accumulation_steps", "epochs"):
        if getattr(s, key) < (0 if key == "max_steps" else 1):
            raise ConfigError(f"sft.{key} must be at least 1, got {getattr(s, key)}")
    return out


class SFTEvaluator:
    """Train and validation loss on a few batches each, and a sample response at step 0 and at each epoch end."""

    def __init__(self, model, acc, train_batches: list, valid_batches: list, metrics: MetricsLogger,
                 responses: ResponseWriter, steps_per_epoch: int) -> None:
        self.model, self.acc, self.metrics, self.responses = model, acc, metrics, responses
        self.train_batches, self.valid_batches, self.steps_per_epoch = train_batches, valid_batches, steps_per_epoch

    def __call__(self, step: int, state: TrainerState) -> None:
        # every rank holds the whole model (no FSDP here), so ranks need not stop at the shortest one's batches
        train = evaluate_loss(self.model, self.train_batches, self.acc, lockstep=False)["loss"]
        valid = evaluate_loss(self.model, self.valid_batches, self.acc, lockstep=False)
        state.best_val_loss = min(state.best_val_loss, valid["loss"])
        state.history.append({"step": step, "train_loss": train, **valid})
        self.metrics.record({"eval/loss": valid["loss"], "eval/train_loss": train,
                             "eval/perplexity": valid["perplexity"]}, step)
        log.info("sft @ step %d (epoch %.2f): train loss %.4f, validation loss %.4f", step,
                 step / self.steps_per_epoch, train, valid["loss"])
        if step == 0:
            self.responses.sample(step, "before fine-tuning")
        self.model.train()

    def after_step(self, step: int, state: TrainerState) -> None:
        if step % self.steps_per_epoch == 0:
            self.responses.sample(step, f"end of epoch {step // self.steps_per_epoch}")
            self.model.train()


def sft_fingerprint(run_cfg: Config, base: Path) -> str:
    """What must match to resume or skip: the recipe, the shared train switches, the records and the base."""
    inputs = {"sft": fingerprint(run_cfg.paths.resolve("sft")), "base": fingerprint(base)}
    return canonical_json({**identity(run_cfg, ("sft", *SHARED_TRAIN_KEYS)), "inputs": inputs})


def export_final(acc, model, out: Path, base: Path, eos_id: int, cfg: Config, lora: bool) -> Path:
    """`final/`: the merged model in its architecture's transformers format (and, for LoRA, `adapter/` alone), on the main process."""
    if not acc.is_main_process:
        return out / "final"
    gpt = acc.unwrap_model(model)
    if lora:
        with staged_dir(out / "adapter") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state(gpt).items()},
                      str(tmp / "adapter.safetensors"))
            s = cfg.sft
            (tmp / "adapter_config.json").write_text(json.dumps(
                {"rank": s.lora_rank, "alpha": s.lora_alpha, "dropout": s.lora_dropout, "targets": s.lora_targets,
                 "base": str(base)}, indent=2) + "\n")
        gpt = merge_lora(copy.deepcopy(gpt))
    with staged_dir(out / "final") as tmp:
        write_model_dir(tmp, gpt, gpt.state_dict(), base, eos_id, cfg)
    return out / "final"


@dataclass
class Records:
    """The base model and the records encoded for it: what a fine-tuning run is made of before it starts."""

    base: Path
    tokenizer: Any
    gpt: Any
    eos_id: int
    max_len: int  # allowed_max_length within the model's context
    splits: dict[str, tuple[list[dict], list, int]]  # split -> (records, examples with targets, dropped)


def load_records(cfg: Config) -> Records:
    """Resolve sft.base, load it, and encode every split with its tokenizer."""
    s = cfg.sft
    base = resolve_base(cfg)
    tokenizer, gpt = load_tokenizer(base), load_hf(base)
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    if eos_id is None:
        raise ValueError(f"{base}/tokenizer.json has no {cfg.tokenizer.eos_token!r} (tokenizer.eos_token)")
    max_len = min(s.allowed_max_length, gpt.config.n_positions)
    sft_dir = cfg.paths.resolve("sft")
    splits = {name: encode_split(sft_dir / f"{name}.jsonl", tokenizer, eos_id, max_len, s.mask_prompt)
              for name in ("train", "valid", "test")}
    if not splits["valid"][1]:
        raise ValueError(f"{sft_dir}/valid.jsonl has no example with a target: nothing to validate on")
    return Records(base, tokenizer, gpt, eos_id, max_len, splits)


def steps_per_epoch(rows: int, s, world_size: int) -> int:
    """Optimizer steps in one pass over the training rows (drop_last); a clear error when there is none."""
    steps = rows // (s.batch_size * world_size) // s.gradient_accumulation_steps
    if steps < 1:
        raise ValueError(f"{rows} training rows make no optimizer step of sft.batch_size {s.batch_size} x "
                         f"{world_size} process(es) x accumulation {s.gradient_accumulation_steps}")
    return steps


def already_done(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The scores of a finished run of this identity (final/ and responses.json), else None."""
    if (out / "final" / "config.yaml").is_file() and (out / "responses.json").is_file():
        done = json.loads((out / "responses.json").read_text())
        if done.get("fingerprint") == fingerprint:
            return done["metrics"]
    return None


def build_loop(run_cfg: Config, acc, r: Records, rows: list, out: Path, fp: str, per_epoch: int) -> Loop:
    """The model (LoRA-adapted if asked), optimizer, batches, checkpointer, metrics and evaluator of the run."""
    s, t = run_cfg.sft, run_cfg.train
    resume_from, prior = find_resume(run_cfg, out, fp, run_key="sft.run_name")
    set_seed(t.seed)
    if s.method == "lora":
        adapted = apply_lora(r.gpt, s.lora_targets, s.lora_rank, s.lora_alpha, s.lora_dropout)
        log.info("sft: LoRA r=%d alpha=%g on %d layers", s.lora_rank, s.lora_alpha, len(adapted))
    model, optimizer = prepare_model(r.gpt.to(acc.device), build_optimizer(r.gpt, t, acc), t, acc)
    train_loader = EpochBatches(rows, row_collate(s.packing, r.eos_id), s.batch_size, acc.process_index,
                                acc.num_processes, t.seed, s.gradient_accumulation_steps)
    export = (lambda w: merged_weights(acc.unwrap_model(model), w)) if s.method == "lora" else None
    checkpointer = Checkpointer(acc, out, t.keep_last, None, export)
    state = (checkpointer.restore(resume_from, train_loader) if prior is not None
             else TrainerState(config_fingerprint=fp))
    metrics = MetricsLogger(acc, out / "logs" / "metrics.jsonl", 0, r.gpt.flops_per_token(r.max_len), t.peak_flops,
                            extra=lambda step: {"train/epoch": step / per_epoch})
    batches = {name: ordered_batches(make_rows(r.splits[name][1], False, r.max_len, 0), row_collate(False, r.eos_id),
                                     s.batch_size, acc.process_index, acc.num_processes, s.eval_batches)
               for name in ("train", "valid")}
    writer = ResponseWriter(acc, model, r.tokenizer, r.splits["valid"][0][0], r.eos_id, s.max_new_tokens,
                            out / "logs" / "samples.jsonl")
    evaluator = SFTEvaluator(model, acc, batches["train"], batches["valid"], metrics, writer, per_epoch)
    return Loop(run_cfg, acc, model, optimizer, train_loader, checkpointer, metrics, state, r.base, r.eos_id,
                s.gradient_accumulation_steps, 0, evaluator, evaluator.after_step, section="sft")


def run_sft(cfg: Config) -> dict[str, Any]:
    """Fine-tune sft.base on the instruction records; rank 0 returns a summary."""
    s, r = cfg.sft, load_records(cfg)
    rows = make_rows(r.splits["train"][1], s.packing, r.max_len, cfg.train.seed)
    out = cfg.paths.resolve("runs") / s.run_name
    acc = make_accelerator(cfg, out)  # the launch's world size sets the steps per epoch
    if acc.is_fsdp2:
        raise ConfigError("sft under FSDP is not supported: the base is loaded whole on every rank; launch with "
                          "DDP (configs/accelerate/ddp.yaml) or one process")
    per_epoch = steps_per_epoch(len(rows), s, acc.num_processes)
    run_cfg = derive_train_config(cfg, per_epoch)
    fp = sft_fingerprint(run_cfg, r.base)
    if (scores := already_done(out, fp)) is not None:
        log.info("sft: %s is up to date, skipping", out / "final")
        return {"skipped": True, "final": str(out / "final"), **scores}
    trainable_before = sum(p.numel() for p in r.gpt.parameters())
    loop = build_loop(run_cfg, acc, r, rows, out, fp, per_epoch)
    trainable = sum(p.numel() for p in r.gpt.parameters() if p.requires_grad)
    acc.init_trackers(s.run_name, config={"sft": canonical_json(run_cfg.to_dict()["sft"])})
    if acc.is_main_process:
        run_cfg.save(out / "config.yaml")
    dropped = {name: split[2] for name, split in r.splits.items()}
    log.info("sft: %s from %s, %d train rows (%s), %d steps/epoch, %d steps, %.2fM trainable of %.2fM, dropped "
             "without target %s", s.method, r.base, len(rows), "packed" if s.packing else "padded", per_epoch,
             run_cfg.train.max_steps, trainable / 1e6, trainable_before / 1e6, dropped)
    done = fit(loop)
    final = export_final(acc, loop.model, out, r.base, r.eos_id, run_cfg, s.method == "lora")
    result = score_test_split(acc, loop.model, r.tokenizer, r.splits["test"][0], r.eos_id, s.max_new_tokens, out, fp)
    if acc.is_main_process:
        from ..plots import plot_run

        plot_run(out)
    history, state = loop.state.history, loop.state
    return {"skipped": False, "final": str(final), "method": s.method, "processes": acc.num_processes,
            "steps": state.step, "trainable_params": trainable, "train_rows": len(rows),
            "dropped_without_target": dropped, "seconds": round(done["seconds"], 1), "tokens_seen": state.tokens_seen,
            "val_loss_before": history[0]["loss"] if history else None,
            "val_loss_after": history[-1]["loss"] if history else None, **result}
