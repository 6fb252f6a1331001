"""Instruction fine-tuning (SFT) throughput: padded vs packed batches, LoRA vs full fine-tuning, in one run.

    python scripts/bench_sft.py                                   # CPU: tiny preset, rows of 512 tokens
    python scripts/bench_sft.py --device cuda --preset small      # GPU: bf16, compiled blocks, rows of 1024
    python scripts/bench_sft.py --base work/tiny/runs/sft/final   # a real checkpoint (and its tokenizer)

The data is built here, so it runs on a fresh machine: docstring instruction records mined from this interpreter's
standard library (`codeparrot.sft.data.mine_docstrings`, test directories skipped, at most --max-files files) and,
without --tokenizer/--base, a small byte-level BPE trained on them. Without --base the model is a fresh GPT of
--preset: throughput does not depend on the weights. Every config runs the fine-tuning stage's own code path: its
rows (`make_rows`), collate (`row_collate`), loader (`EpochBatches`), optimizer and wrapping (`build_optimizer`,
`prepare_model`) and `train_step` (token-weighted loss; document-masked attention for packed rows).

Measured after --warmup untimed steps, over --steps timed ones (the best of --repeats such windows):
- target tok/s: supervised target tokens (targets != -100) of the batches consumed, per second;
- fill: target tokens / tokens computed (B x T of the batches): what padding wastes;
- trainable parameters, and train-state MiB = trainable x 16 bytes (fp32 weight, grad, AdamW m and v);
- peak MiB: torch.cuda.max_memory_allocated on CUDA (weights, optimizer, activations); n/a on CPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator

from codeparrot.config import TrainConfig
from codeparrot.model import GPT, PRESETS, GPTConfig, load_hf
from codeparrot.sft.collate import has_targets, make_example
from codeparrot.sft.data import mine_docstrings
from codeparrot.sft.finetune import make_rows
from codeparrot.sft.format import encode_record, format_prompt
from codeparrot.sft.loader import EpochBatches, row_collate
from codeparrot.sft.lora import apply_lora
from codeparrot.tokenizer import load_tokenizer, train_on
from codeparrot.train import build_optimizer, prepare_model, train_step

EOS = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "turtledemo", "lib2to3", "__pycache__"}


def stdlib_records(max_files: int) -> tuple[list[dict], int]:
    """Docstring instruction records (deduplicated by output) of the first stdlib files, and the files read."""
    root = Path(os.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    records, seen, counts = [], set(), Counter()
    for path in files[:max_files]:
        source = path.read_text(encoding="utf-8", errors="replace")
        for record in mine_docstrings(source, str(path.relative_to(root)), 20, 2, counts):
            if record["output"] not in seen:
                seen.add(record["output"])
                records.append(record)
    return records, min(len(files), max_files)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(args, vocab_size: int, max_len: int) -> GPT:
    torch.manual_seed(0)
    if args.base:
        return load_hf(args.base)
    return GPT(GPTConfig(vocab_size=vocab_size, n_positions=max_len, **PRESETS[args.preset]))


def window(step, steps: int, device: torch.device) -> dict:
    """`steps` timed steps, the device synchronised at both ends: target tokens/s, fill, ms per step, data wait."""
    targets, computed = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), device=device)
    start, wait = time.perf_counter(), 0.0
    for _ in range(steps):
        result = step()
        targets += sum((b["targets"] != -100).sum() for b in result.batches)
        computed += result.tokens  # B x T of the step's batches, padding included
        wait += result.data_wait
    sync(device)
    seconds = time.perf_counter() - start
    return {"tok_s": targets.item() / seconds, "fill": targets.item() / computed.item(),
            "step_ms": 1e3 * seconds / steps, "wait": wait / seconds}


def bench(args, method: str, loader: EpochBatches, acc: Accelerator, vocab_size: int, max_len: int) -> dict:
    """Warm-up, then the best of --repeats timed windows, of one config on a fresh model and optimizer."""
    device = acc.device
    gpt = new_model(args, vocab_size, max_len)
    if method == "lora":
        apply_lora(gpt, args.lora_targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
    trainable = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
    t = TrainConfig(learning_rate=2e-4 if method == "lora" else 5e-5, weight_decay=0.1, compile=args.compile)
    model, optimizer = prepare_model(gpt.to(device), build_optimizer(gpt, t, acc), t, acc)  # in train mode
    batches = iter(loader)
    step = lambda: train_step(model, optimizer, batches, acc, 1, t.max_grad_norm, t.learning_rate)  # noqa: E731
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = max((window(step, args.steps, device) for _ in range(args.repeats)), key=lambda r: r["tok_s"])
    out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    out.update(trainable=trainable, state_mib=trainable * 16 / 2**20)
    del model, optimizer, gpt, batches, step
    acc.free_memory()
    gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda")[:3 if torch.cuda.is_available() else 2])
    p.add_argument("--preset", default=None, choices=tuple(PRESETS), help="default: small on CUDA, tiny on CPU")
    p.add_argument("--base", default=None, help="checkpoint dir (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (tokenizer.json); default: train one here")
    p.add_argument("--vocab", type=int, default=4096, help="vocab of the tokenizer trained here")
    p.add_argument("--max-files", type=int, default=400, help="stdlib .py files mined for records")
    p.add_argument("--max-len", type=int, default=None, help="tokens per row; default 1024 on CUDA, 512 on CPU")
    p.add_argument("--batch-size", type=int, default=8, help="examples per padded batch")
    p.add_argument("--packed-batch-size", type=int, default=0,
                   help="packed rows per batch; 0: as many max-len rows as a padded batch's mean B x T tokens")
    p.add_argument("--mask-prompt", action="store_true", help="train on the responses only (sft.mask_prompt)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="timed windows per config, the fastest kept (busy hosts)")
    p.add_argument("--compile", default=None, type=lambda s: {"true": True, "false": False}[s.lower()],
                   help="true/false; default: on for CUDA, off on CPU (train.compile=null, as the sft stage)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", nargs="+", default=["attn.c_attn", "attn.c_proj"])
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.preset = args.preset or ("small" if cuda else "tiny")
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")

    records, n_files = stdlib_records(args.max_files)
    if args.base or args.tokenizer:
        tok = load_tokenizer(args.base or args.tokenizer)
    else:  # a byte-level BPE on the records' own text
        texts = [format_prompt(r) + r["output"] for r in records]
        tok = train_on(iter([texts]), vocab_size=args.vocab, min_frequency=2, eos_token=EOS)
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise SystemExit(f"the tokenizer has no {EOS!r}")
    max_len = args.max_len or (1024 if cuda else 512)
    if args.base:
        max_len = min(max_len, load_hf(args.base).config.n_positions)
    examples = [make_example(*encode_record(r, tok), eos_id, max_len, args.mask_prompt) for r in records]
    examples = [e for e in examples if has_targets(e)]

    padded_rows, packed_rows = (make_rows(examples, packing, max_len, args.seed) for packing in (False, True))
    B = args.batch_size
    order = EpochBatches(padded_rows, None, B, 0, 1, args.seed).order(0)  # the padded batches' mean B x T: compute
    widths = [max(len(padded_rows[i][0][0]) for i in order[s:s + B]) for s in range(0, len(order) - B + 1, B)]
    mean_tokens = B * sum(widths) / len(widths)
    P = args.packed_batch_size or max(1, round(mean_tokens / max_len))
    loaders = {"padded": lambda: EpochBatches(padded_rows, row_collate(False, eos_id), B, 0, 1, args.seed),
               "packed": lambda: EpochBatches(packed_rows, row_collate(True, eos_id), P, 0, 1, args.seed)}
    configs = [(m, b) for m in ("full", "lora") for b in ("padded", "packed")]  # a fresh loader: the same batches
    results = {(m, b): bench(args, m, loaders[b](), acc, tok.get_vocab_size(), max_len) for m, b in configs}

    lengths = [len(x) for x, _ in examples]
    print(f"data: {len(examples)} examples from {n_files} stdlib files, tokens per example mean "
          f"{sum(lengths) / len(lengths):.0f} max {max(lengths)} (truncated to {max_len}); {len(packed_rows)} packed "
          f"rows (mean {sum(lengths) / len(packed_rows):.0f} tokens); vocab {tok.get_vocab_size()}, "
          f"mask_prompt={args.mask_prompt}")
    print(f"model: {args.base or 'fresh ' + args.preset + ' preset'}, {acc.mixed_precision} on {acc.device}, "
          f"compile={args.compile} (None: on for CUDA); LoRA r={args.lora_rank} alpha={args.lora_alpha:g} on "
          f"{' '.join(args.lora_targets)}; best of {args.repeats} x {args.steps} timed steps after {args.warmup} "
          "warm-up")
    print(f"batches: padded = {B} examples padded to the longest (mean B x T {mean_tokens:.0f} tokens); packed = {P} "
          f"rows of up to {max_len} tokens ({P * max_len} tokens), "
          + ("as given (--packed-batch-size)" if args.packed_batch_size else
             "chosen so that a step computes about as many tokens as a padded one"))
    print(f"{'config':14s} {'target tok/s':>12s} {'vs padded':>9s} {'vs full':>8s} {'fill':>6s} {'step ms':>8s} "
          f"{'trainable':>12s} {'train-state MiB':>15s} {'peak MiB':>9s} {'data wait':>9s}")
    for (m, b), r in results.items():
        vs_padded = r["tok_s"] / results[(m, "padded")]["tok_s"]
        vs_full = r["tok_s"] / results[("full", b)]["tok_s"]
        print(f"{m + ' ' + b:14s} {r['tok_s']:12,.0f} {vs_padded:8.2f}x {vs_full:7.2f}x {r['fill']:6.1%} "
              f"{r['step_ms']:8.1f} {r['trainable']:12,d} {r['state_mib']:15.1f} "
              f"{'n/a' if r['peak_mib'] != r['peak_mib'] else format(r['peak_mib'], '.1f'):>9s} "
              f"{r['wait']:9.1%}")
    full, lora = results[("full", "packed")], results[("lora", "packed")]
    speedup = full["tok_s"] / results[("full", "padded")]["tok_s"]
    print(f"packed / padded target tok/s (full): {speedup:.2f}x (goal >= 1.5x: "
          f"{'met' if speedup >= 1.5 else 'not met'})")
    print(f"lora / full (packed): target tok/s {lora['tok_s'] / full['tok_s']:.2f}x, trainable "
          f"{lora['trainable'] / full['trainable']:.4f}x, train-state {lora['state_mib'] / full['state_mib']:.4f}x, "
          f"peak memory " + (f"{lora['peak_mib'] / full['peak_mib']:.2f}x" if cuda else "n/a (CPU)"))


if __name__ == "__main__":
    main()
