"""Tokens/s each data path delivers to a training loop, side by side, and the CPU cores per GPU it would need.

    .venv/bin/python scripts/bench_data.py [--clean work/tiny/clean] [--tokenizer work/tiny/tokenizer]
                                           [--tokens DIR] [--batch-size 8] [--seq-length 1024] [--seconds 8]

Loaders measured, each in a fresh process (so no measurement inherits another's threads or caches):
- reference: the original CodeParrot ConstantLengthDataset, a plain generator in one process that fills a
  buffer of seq_length * 3.6 * 1024 characters, tokenizes it with encode_batch (what the reference's
  `tokenizer(buffer, truncation=False)` calls), yields the full blocks and drops each buffer's tail;
- streaming: codeparrot's ConstantLengthDataset through `make_dataloader`, with 0, 1 and 2 DataLoader workers;
- token shards: TokenShardDataset (memmap reads, shuffled block order) through `make_dataloader`, 0 and 2 workers.
Without --tokens the script first runs the pretokenize stage into a temporary directory (and reports its speed).

Each measurement discards a warm-up (the first batches: worker start-up, the first buffer), then counts the
batches delivered in a fixed time. CPU time of the process and its DataLoader workers over the same window gives
tokens per CPU-second, and so the cores one GPU needs at --gpu-tokens-per-s (codeparrot-small on one H100 takes
about 0.5 Mtokens/s, DESIGN.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (label, workers)
LOADERS = {
    "reference-0": ("reference: one process, on the fly", 0),
    "streaming-0": ("streaming ConstantLengthDataset", 0),
    "streaming-1": ("streaming ConstantLengthDataset", 1),
    "streaming-2": ("streaming ConstantLengthDataset", 2),
    "tokens-0": ("token shards TokenShardDataset", 0),
    "tokens-2": ("token shards TokenShardDataset", 2),
}


def _cpu_seconds() -> float:
    """utime + stime of this process and its live children (the DataLoader workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        if pid == me or ppid == me:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def reference_loader(files, tokenizer, eos_id: int, seq_length: int, batch_size: int):
    """The reference's ConstantLengthDataset (infinite), batched by a plain torch DataLoader."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from codeparrot.corpus.source import BadRecords, iter_records

    class ReferenceConstantLengthDataset(IterableDataset):
        def __init__(self, num_of_sequences=1024, chars_per_token=3.6):
            self.max_buffer_size = seq_length * chars_per_token * num_of_sequences

        def __iter__(self):
            iterator = iter_records(files, BadRecords())
            while True:
                buffer, buffer_len = [], 0
                while buffer_len < self.max_buffer_size:
                    try:
                        buffer.append(next(iterator)["content"])
                        buffer_len += len(buffer[-1])
                    except StopIteration:
                        iterator = iter_records(files, BadRecords())  # infinite: next epoch
                all_token_ids = []
                for enc in tokenizer.encode_batch(buffer, add_special_tokens=False):
                    all_token_ids.extend(enc.ids + [eos_id])
                for i in range(0, len(all_token_ids), seq_length):
                    input_ids = all_token_ids[i: i + seq_length]
                    if len(input_ids) == seq_length:  # the buffer's tail is dropped
                        yield torch.tensor(input_ids)

    return DataLoader(ReferenceConstantLengthDataset(), batch_size=batch_size)


def measure(args) -> dict:
    """One loader in this process: warm up, then count tokens and CPU time over a fixed window."""
    import warnings

    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    from codeparrot.corpus.source import list_shards
    from codeparrot.data.packing import ConstantLengthDataset, make_dataloader
    from codeparrot.data.tokens import TokenShardDataset
    from codeparrot.tokenizer import load_tokenizer

    kind, workers = args.measure.rsplit("-", 1)
    workers = int(workers)
    b, t = args.batch_size, args.seq_length
    if kind == "tokens":
        ds = TokenShardDataset(args.tokens, "train", t, infinite=True, shuffle=True, seed=1)
        loader = make_dataloader(ds, b, workers)
    else:
        tok = load_tokenizer(args.tokenizer)
        eos = tok.token_to_id("<|endoftext|>")
        files = list_shards(Path(args.clean) / "train")
        if kind == "reference":
            loader = reference_loader(files, tok, eos, t, b)
        else:
            ds = ConstantLengthDataset(files, tok, t, eos, infinite=True)  # DataConfig defaults otherwise
            loader = make_dataloader(ds, b, workers)
    it = iter(loader)
    start = time.perf_counter()
    warm = 0
    while warm < args.warmup_batches or time.perf_counter() - start < args.warmup_seconds:
        next(it)
        warm += 1
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < args.seconds:
        batch = next(it)
        assert batch.shape == (b, t)
        n += 1
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    tokens = n * b * t
    return {"name": args.measure, "batches": n, "tokens": tokens, "seconds": seconds, "cpu_seconds": cpu,
            "warmup_batches": warm}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean", default=str(REPO / "work/tiny/clean"))
    p.add_argument("--tokenizer", default=str(REPO / "work/tiny/tokenizer"))
    p.add_argument("--tokens", default="", help="an existing tokens/ made with --tokenizer; default: pretokenize "
                   "--clean into a temporary directory first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=8.0, help="measurement window per loader")
    p.add_argument("--warmup-batches", type=int, default=20)
    p.add_argument("--warmup-seconds", type=float, default=1.0)
    p.add_argument("--gpu-tokens-per-s", type=float, default=0.5e6,
                   help="what one GPU consumes (codeparrot-small on an H100: ~0.5M)")
    p.add_argument("--only", default=",".join(LOADERS), help="comma-separated subset of " + ",".join(LOADERS))
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one loader in this process
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return 0

    from codeparrot.config import load_config
    from codeparrot.data.pretokenize import load_meta, run_pretokenize

    print(f"cpu cores: {os.cpu_count()}, batch {args.batch_size} x seq {args.seq_length}, "
          f"{args.seconds:g} s per measurement after warm-up; corpus {args.clean}, tokenizer {args.tokenizer}")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if not args.tokens:
            args.tokens = str(Path(tmp) / "tokens")
            cfg = load_config(None, [f"paths.clean={args.clean}", f"paths.tokenizer={args.tokenizer}",
                                     f"paths.tokens={args.tokens}"])
            r = run_pretokenize(cfg)
            print(f"pretokenize: {r['train_tokens'] + r['valid_tokens']:,} tokens ({r['dtype']}) in {r['seconds']} s "
                  f"with {r['num_proc']} processes: {r['tokens_per_s'] / 1e6:.2f} Mtokens/s, {r['mb_per_s']} MB/s "
                  f"of text")
        meta = load_meta(args.tokens)
        print(f"token shards: {meta['splits']['train']['tokens']:,} train tokens, vocab {meta['vocab_size']}")
        rows = []
        for name in args.only.split(","):
            cmd = [sys.executable, __file__, "--measure", name, "--clean", args.clean, "--tokenizer", args.tokenizer,
                   "--tokens", args.tokens, "--batch-size", str(args.batch_size), "--seq-length",
                   str(args.seq_length), "--seconds", str(args.seconds), "--warmup-batches",
                   str(args.warmup_batches), "--warmup-seconds", str(args.warmup_seconds)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    gpu = args.gpu_tokens_per_s
    print()
    print(f"{'loader':38} {'workers':>7} {'Mtok/s':>9} {'CPU cores busy':>15} {'Mtok/CPU-s':>11} "
          f"{'cores/GPU @' + format(gpu / 1e6, 'g') + 'M':>17}")
    results = {}
    for r in rows:
        label, workers = LOADERS[r["name"]]
        rate = r["tokens"] / r["seconds"]
        busy = r["cpu_seconds"] / r["seconds"]
        per_cpu = r["tokens"] / max(r["cpu_seconds"], 1e-9)
        results[r["name"]] = rate
        print(f"{label:38} {workers:>7} {rate / 1e6:>9.2f} {busy:>15.2f} {per_cpu / 1e6:>11.2f} {gpu / per_cpu:>17.3f}")
    print()
    print("cores/GPU = GPU tokens/s / (tokens per CPU-second of the loader's processes); a DataLoader worker also")
    print("needs its core to itself, so round up per worker, and the training process needs its own core.")
    if "streaming-2" in results:
        ok = results["streaming-2"] >= 0.7e6
        print(f"goal streaming, 2 workers >= 0.7 Mtok/s: {results['streaming-2'] / 1e6:.2f} -> "
              f"{'met' if ok else 'NOT met'}")
    shard_rates = {k: v for k, v in results.items() if k.startswith("tokens-")}
    if shard_rates:
        best = max(shard_rates, key=shard_rates.get)
        print(f"goal token shards >= 50 Mtok/s: best {shard_rates[best] / 1e6:.1f} ({best}) -> "
              f"{'met' if shard_rates[best] >= 50e6 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
