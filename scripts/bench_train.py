"""Time optimizer steps of a model preset on real packed data (token shards): tokens/s, MFU, peak memory, data wait.

    python scripts/bench_train.py --tokens work/tiny/tokens --preset small --micro-batch 64 --steps 30 [--baseline]
    python scripts/bench_train.py ... --json work/bench_train.json   # the figures as JSON too (scripts/gpu_check.py)
    accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/bench_train.py --preset large ...

Our path is the training loop's own code (`build_model`, `build_optimizer`, `prepare_model`, `train_step`). `--baseline` also times, in the
same run, the reference CodeParrot setup: transformers' GPT2LMHeadModel with `scale_attn_by_inverse_layer_idx` and
`reorder_and_upcast_attn` (as CodeParrot's initialize_model.py configured it), eager attention, plain AdamW, no
compile, on the same data and batch, and prints the ratio. Extra `section.key=value` arguments override the config.
Run `codeparrot pretokenize --config configs/tiny.yaml` first to make token shards from the embedded corpus.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from codeparrot.config import load_config
from codeparrot.data.packing import make_dataloader
from codeparrot.data.tokens import TokenShardDataset
from codeparrot.runs import resolve_mixed_precision
from codeparrot.train import build_model, build_optimizer, prepare_model, train_step


# Short keys of the setups in --json; the printed table shows the labels.
LABELS = {"codeparrot": "codeparrot", "reference": "reference (transformers GPT2LMHeadModel)"}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, batches, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Run warm-up steps, then time `steps` steps with device synchronisation at both ends."""
    for _ in range(warmup):
        step_fn(batches)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, wait = time.perf_counter(), 0.0
    loss = torch.zeros((), device=device)
    for _ in range(steps):
        result = step_fn(batches)
        loss += result.loss
        wait += result.data_wait
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "data_wait": wait / seconds, "peak_gib": peak, "loss": loss.item() / steps}


def reference_model(cfg, vocab_size: int, accelerator: Accelerator):
    """CodeParrot's GPT-2 (transformers) with its stability options, plain AdamW and the same schedule."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from codeparrot.model import PRESETS

    shape = PRESETS[cfg.model.preset]
    hf_cfg = GPT2Config(vocab_size=vocab_size, n_positions=cfg.data.seq_length, n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], scale_attn_by_inverse_layer_idx=True,
                        reorder_and_upcast_attn=True, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")  # its upcast needs eager
    model = GPT2LMHeadModel(hf_cfg)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    return accelerator.prepare(model, optimizer)


def finite_or_none(value: Any) -> Any:
    """NaN (peak memory on a CPU) as null: strict JSON has no NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: str, report: dict[str, Any]) -> None:
    """Write the run's settings and results as JSON (read by scripts/gpu_check.py instead of the printed table)."""
    results = {name: {k: finite_or_none(v) for k, v in r.items()} for name, r in report["results"].items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**report, "results": results}, indent=2) + "\n")


def our_setup(cfg, vocab_size: int, accelerator: Accelerator):
    """The training loop's own model and optimizer, prepared (and compiled) as `codeparrot train` does."""
    model = build_model(cfg, vocab_size, accelerator)
    return prepare_model(model, build_optimizer(model, cfg.train, accelerator), cfg.train, accelerator)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="work/tiny/tokens", help="a pretokenize artifact (tokens/)")
    p.add_argument("--preset", default="small")
    p.add_argument("--micro-batch", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768, help="model vocab (token ids of the shards must be below)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None, help="per device; default train.peak_flops")
    p.add_argument("--baseline", action="store_true", help="also time the reference setup and print the ratio")
    p.add_argument("--json", help="also write the settings and results to this JSON file")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args()
    logging.basicConfig(level="WARNING")

    cfg = load_config(None, [f"model.preset={args.preset}", f"data.seq_length={args.seq}",
                             f"train.micro_batch_size={args.micro_batch}", "train.max_steps=100000",
                             "train.warmup_steps=100", *args.overrides])
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision))
    device = accelerator.device
    peak_flops = args.peak_flops or cfg.train.peak_flops
    dataset = TokenShardDataset(args.tokens, "train", args.seq, infinite=True, shuffle=True, seed=1,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    batches = iter(make_dataloader(dataset, args.micro_batch, args.workers, pin_memory=device.type == "cuda"))
    tokens_per_step = args.micro_batch * args.seq * cfg.train.gradient_accumulation_steps * accelerator.num_processes

    setups = [("codeparrot", lambda: our_setup(cfg, args.vocab, accelerator))]
    if args.baseline:
        setups.append(("reference", lambda: reference_model(cfg, args.vocab, accelerator)))
    results = {}
    flops_per_token = None
    for name, build in setups:
        model, optimizer = build()
        if flops_per_token is None:
            flops_per_token = accelerator.unwrap_model(model).flops_per_token(args.seq)

        def step_fn(batches, model=model, optimizer=optimizer):  # a constant lr: the schedule costs nothing
            return train_step(model, optimizer, batches, accelerator, cfg.train.gradient_accumulation_steps,
                              cfg.train.max_grad_norm, cfg.train.learning_rate)
        r = time_steps(step_fn, batches, args.warmup, args.steps, device)
        r["tokens_per_s"] = args.steps * tokens_per_step / r["seconds"]
        r["mfu"] = flops_per_token * r["tokens_per_s"] / (peak_flops * accelerator.num_processes)
        results[name] = r
        del model, optimizer, step_fn
        accelerator.free_memory()
        gc.collect()

    if accelerator.is_main_process:
        print(f"preset {args.preset}, micro-batch {args.micro_batch} x seq {args.seq} x accumulation "
              f"{cfg.train.gradient_accumulation_steps} x {accelerator.num_processes} process(es), vocab {args.vocab}, "
              f"{accelerator.mixed_precision} on {device}; {args.steps} timed steps after {args.warmup} warm-up")
        print(f"settings: compile={cfg.train.compile} (null = on for CUDA), fused_adamw={cfg.train.fused_adamw}, "
              f"tf32={cfg.train.tf32}, attention={cfg.model.attention_backend}, "
              f"loss_chunk_size={cfg.model.loss_chunk_size}, checkpointing={cfg.model.gradient_checkpointing}")
        print(f"{'setup':44s} {'tokens/s':>12s} {'MFU':>7s} {'peak GiB':>9s} {'data wait':>10s} {'loss':>7s}")
        for name, r in results.items():
            print(f"{LABELS[name]:44s} {r['tokens_per_s']:12,.0f} {r['mfu']:7.1%} {r['peak_gib']:9.1f} "
                  f"{r['data_wait']:10.1%} {r['loss']:7.3f}")
        speedup = results["codeparrot"]["tokens_per_s"] / results["reference"]["tokens_per_s"] if args.baseline \
            else None
        if speedup is not None:
            print(f"speed-up over the reference: {speedup:.2f}x")
        if args.json:
            write_json(args.json, {
                "preset": args.preset, "micro_batch": args.micro_batch, "seq": args.seq, "vocab": args.vocab,
                "accumulation": cfg.train.gradient_accumulation_steps, "processes": accelerator.num_processes,
                "mixed_precision": accelerator.mixed_precision, "device": str(device), "steps": args.steps,
                "warmup": args.warmup, "tokens_per_step": tokens_per_step, "peak_flops": peak_flops,
                "flops_per_token": flops_per_token, "compile": cfg.train.compile,
                "gradient_checkpointing": cfg.model.gradient_checkpointing, "results": results, "speedup": speedup})


if __name__ == "__main__":
    main()
