"""The 2025 recipe against the GPT-2 recipe, one part at a time: validation loss at equal tokens, the tokens needed to
reach the GPT-2 recipe's final loss, and wall-clock per token, all measured in one run on one machine.

    python scripts/bench_recipe.py                                    # tiny.yaml's data and budget (CPU)
    python scripts/bench_recipe.py --steps 200 --recipes gpt2,modern  # a shorter budget, two recipes
    python scripts/bench_recipe.py --config configs/codeparrot-small.yaml --preset small --steps 2000   # a GPU

Every recipe is a real `codeparrot train` run (a subprocess) from the same config (`--config`: its tokenizer, token
shards, validation split, batch and budget), each with its own `train.run_name` under `<out>/runs`:

    gpt2     the config as it is (tiny.yaml: GPT-2, AdamW, cosine)
    llama    + the Llama-style model (model.arch and its shape keys), still AdamW and cosine
    muon     + Muon (train.optimizer and the muon_* keys)
    wsd      + the warmup-stable-decay schedule (lr_schedule, decay_fraction, decay_shape, min_lr_ratio)
    docmask  + document masking (data.document_mask=true); only when the config tree has that key
    modern   the whole modern recipe: the above and every other recipe key of --modern-config (z_loss,
             embedding_weight_decay, learning rates, warmup), document masking included when the key exists

The ablations take each key's value from --modern-config (default configs/tiny-modern.yaml), so they add up to the
modern recipe. Per recipe it prints the validation loss after the whole budget, the tokens at which its validation
curve (every --eval-interval steps, linearly interpolated) first reaches the GPT-2 recipe's final loss as a fraction
of the budget ("not reached" otherwise), and its wall-clock per training token relative to the GPT-2 recipe
(training steps only: `train/tokens_per_s` of metrics.jsonl, the first log window left out). A WSD run's loss drops
during its decay, so its "tokens to reach" is that of this budget's schedule, not of a shorter WSD run. Writes
`<out>/recipe.png` (every validation curve against tokens) and `<out>/recipe.json`. Extra `section.key=value`
arguments override every recipe's config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from codeparrot.config import SECTIONS, load_config  # noqa: E402

ARCH_KEYS = ["model.arch", "model.n_kv_head", "model.intermediate_size", "model.rope_theta", "model.norm_eps",
             "model.qk_norm", "model.tie_embeddings"]
MUON_KEYS = ["train.optimizer", "train.muon_learning_rate", "train.muon_momentum", "train.muon_weight_decay"]
WSD_KEYS = ["train.lr_schedule", "train.decay_fraction", "train.decay_shape", "train.min_lr_ratio"]
OTHER_KEYS = ["train.z_loss", "train.embedding_weight_decay", "train.learning_rate", "train.weight_decay",
              "train.adam_beta1", "train.adam_beta2", "train.warmup_steps"]
DOCMASK = "data.document_mask"
ORDER = ["gpt2", "llama", "muon", "wsd", "docmask", "modern"]
LABELS = {"gpt2": "gpt2 (AdamW, cosine)", "llama": "+ llama arch", "muon": "+ muon", "wsd": "+ wsd",
          "docmask": "+ document mask", "modern": "modern (full recipe)"}


def has_document_mask() -> bool:
    """Whether the config tree has data.document_mask (added by a separate change)."""
    return "document_mask" in {f.name for f in dataclasses.fields(SECTIONS["data"])}


def format_value(value: Any) -> str:
    """A config value as an override's text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def key_value(cfg, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def recipe_overrides(name: str, modern) -> list[str]:
    """The keys a recipe takes from the modern config, as overrides on top of the base config."""
    keys: list[str] = []
    extra: list[str] = []
    for step, group in (("llama", ARCH_KEYS), ("muon", MUON_KEYS), ("wsd", WSD_KEYS)):
        keys += group
        if name == step:
            break
    else:
        if has_document_mask():
            extra.append(f"{DOCMASK}=true")
        if name == "modern":
            keys += OTHER_KEYS
    return [f"{k}={format_value(key_value(modern, k))}" for k in keys] + extra


def read_run(run: Path) -> dict[str, Any]:
    """A finished run's eval curve (tokens, loss), tokens per step, and training seconds per token."""
    steps = sorted(run.glob("step-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    state = json.loads(steps[-1].read_text())
    per_step = state["tokens_seen"] / state["step"]
    history = {h["step"]: h["loss"] for h in state["history"]}
    curve = [(s * per_step, loss) for s, loss in sorted(history.items())]
    windows = []
    last_tokens = 0.0
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/tokens_per_s" in r:
            windows.append((r["train/tokens_seen"] - last_tokens, r["train/tokens_per_s"]))
            last_tokens = r["train/tokens_seen"]
    timed = windows[1:] or windows  # the first window holds start-up (allocator, first batches)
    seconds = sum(n / tps for n, tps in timed if tps > 0)
    return {"curve": curve, "tokens": state["tokens_seen"], "steps": state["step"],
            "final_loss": curve[-1][1], "s_per_token": seconds / sum(n for n, _ in timed)}


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target`, linearly interpolated between evaluations; None if never."""
    for i, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return tokens
            t0, l0 = curve[i - 1]
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
    return None


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The printed rows: one per recipe, GPT-2's first, the ratios against it."""
    base = results["gpt2"]
    target = base["final_loss"]
    lines = [f"{'recipe':24s} {'val loss':>9s} {'tokens to gpt2 loss':>20s} {'wall/token (runs)':>18s} "
             f"{'step time (interleaved)':>24s}"]
    for name, r in results.items():
        reach = tokens_to_reach(r["curve"], target)
        r["reach_fraction"] = None if reach is None else reach / base["tokens"]
        r["wall_ratio"] = r["s_per_token"] / base["s_per_token"]
        frac = "not reached" if reach is None else f"{r['reach_fraction']:.2f}"
        step = "-"
        if r.get("step_s") and base.get("step_s"):
            r["step_ratio"] = r["step_s"] / base["step_s"]
            step = f"{r['step_s'] * 1000:.0f} ms = {r['step_ratio']:.2f}x"
        lines.append(f"{LABELS[name]:24s} {r['final_loss']:9.3f} {frac:>20s} {r['wall_ratio']:17.2f}x {step:>24s}")
    return lines


def token_meta(cfg) -> tuple[Path, dict[str, Any]]:
    """cfg's token-shard directory and its meta.json."""
    tokens = Path(cfg.paths.tokens) if cfg.paths.tokens else Path(cfg.paths.workdir) / "tokens"
    return tokens, json.loads((tokens / "meta.json").read_text())


def token_blocks(cfg, n_blocks: int, seed: int = 0) -> torch.Tensor:
    """n_blocks blocks of real training tokens from cfg's first train shard (the step timing's input), [n, T]."""
    import numpy as np

    tokens, meta = token_meta(cfg)
    ids = np.fromfile(tokens / meta["splits"]["train"]["files"][0]["path"], dtype=meta["dtype"]).astype(np.int64)
    T = cfg.data.seq_length
    starts = np.random.default_rng(seed).integers(0, len(ids) - T, n_blocks)
    return torch.from_numpy(np.stack([ids[s:s + T] for s in starts]))


def interleaved_step_seconds(configs: dict[str, Any], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step of each recipe, timed round-robin (`rounds` x `steps` steps each) on the
    same real token blocks through train.py's own builders and train_step. Runs one after another share a machine
    with whatever else runs on it over a quarter of an hour; interleaving gives every recipe the same conditions."""
    from accelerate import Accelerator

    from codeparrot.data.packing import DocumentBlocks
    from codeparrot.train import build_model, build_optimizer, train_step

    accelerator = Accelerator(cpu=True)
    base = next(iter(configs.values()))
    _, meta = token_meta(base)
    B, G = base.train.micro_batch_size, base.train.gradient_accumulation_steps
    blocks = token_blocks(base, B * G * steps)
    setups = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = build_model(cfg, meta["vocab_size"], accelerator)
        optimizer = build_optimizer(model, cfg.train, accelerator)
        collate = DocumentBlocks(meta["eos_token_id"]) if getattr(cfg.data, "document_mask", False) else torch.stack
        batches = [collate(list(blocks[i:i + B])) for i in range(0, len(blocks), B)]
        setups[name] = (model, optimizer, batches, cfg.train)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds + 1):  # round 0 warms every recipe up (allocator, first Newton-Schulz calls)
        for name, (model, optimizer, batches, t) in setups.items():
            it = iter(batches)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, optimizer, it, accelerator, G, t.max_grad_norm, t.learning_rate, z_loss=t.z_loss)
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        xs, ys = zip(*[(t, loss) for t, loss in r["curve"] if t > 0] or r["curve"])
        ax.plot(xs, ys, marker="o", markersize=3, label=LABELS[name])
    ax.axhline(results["gpt2"]["final_loss"], color="gray", linestyle="--", linewidth=0.8,
               label="gpt2's final loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("GPT-2 recipe -> 2025 recipe")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_recipe(name: str, config: str, overrides: list[str], out: Path) -> dict[str, Any] | None:
    """Train one recipe as `codeparrot train` (a subprocess, its output in <out>/<name>.log); its results, or None
    when it failed (its log's last lines printed)."""
    run = out / "runs" / name
    if run.exists():
        shutil.rmtree(run)
    cmd = [sys.executable, "-m", "codeparrot", "train", "--config", config, *overrides, f"train.run_name={name}"]
    log = out / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=os.getcwd()).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"{name}: codeparrot train failed (exit {rc}); the last lines of {log}:")
        print("\n".join(log.read_text().splitlines()[-20:]))
        return None
    result = read_run(run)
    result.update(wall_s=wall, overrides=overrides)
    print(f"{name}: final validation loss {result['final_loss']:.3f} after {wall:.0f} s", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="the GPT-2 recipe and the data")
    p.add_argument("--modern-config", default=str(ROOT / "configs" / "tiny-modern.yaml"),
                   help="where the modern recipe's keys come from")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per recipe; default train.max_steps")
    p.add_argument("--eval-interval", type=int, default=None, help="default steps/10")
    p.add_argument("--preset", default=None, help="model.preset for every recipe (small: seq 1024 too)")
    p.add_argument("--recipes", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--out", default=None, help="default <workdir>/bench_recipe")
    p.add_argument("--timing-rounds", type=int, default=5,
                   help="after training, time every recipe's steps round-robin this many rounds (0: skip)")
    p.add_argument("--timing-steps", type=int, default=5, help="optimizer steps per recipe per timing round")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of every recipe")
    args = p.parse_args()

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in ORDER]
    if unknown:
        p.error(f"unknown recipes {unknown}; valid: {', '.join(ORDER)}")
    if "docmask" in recipes and not has_document_mask():
        print("docmask skipped: the config tree has no data.document_mask key")
        recipes.remove("docmask")
    recipes = ["gpt2"] + [r for r in ORDER if r in recipes and r != "gpt2"]  # gpt2 is every ratio's base

    common = list(args.overrides)
    if args.preset:
        common = [f"model.preset={args.preset}", *(["data.seq_length=1024"] if args.preset != "tiny" else []),
                  *common]
    base = load_config(args.config, common)
    modern = load_config(args.modern_config, common)
    steps = args.steps or base.train.max_steps
    eval_interval = args.eval_interval or max(1, steps // 10)
    out = Path(args.out) if args.out else Path(base.paths.workdir) / "bench_recipe"
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    budget = [f"paths.runs={runs.resolve()}", f"train.max_steps={steps}", f"train.eval_interval={eval_interval}",
              f"train.save_interval={steps}", "train.keep_last=1", "train.resume=none",
              f"train.log_interval={max(1, min(base.train.log_interval, steps // 10))}"]
    warmup = min(base.train.warmup_steps, max(1, steps // 5))
    print(f"{len(recipes)} recipes x {steps} steps of {base.train.micro_batch_size} x {base.data.seq_length} tokens "
          f"(x accumulation), eval every {eval_interval} steps on {base.eval.max_batches} batches; "
          f"data {base.paths.workdir}; modern keys from {args.modern_config}; "
          f"document mask: {'measured' if has_document_mask() else 'no data.document_mask key, not measured'}",
          flush=True)

    results: dict[str, dict[str, Any]] = {}
    overrides: dict[str, list[str]] = {}
    for name in recipes:
        keys = recipe_overrides(name, modern) if name != "gpt2" else []
        # the base warmup, shortened for a short budget; the modern recipe takes its own (scaled the same way)
        own_warmup = min(modern.train.warmup_steps, max(1, steps // 5)) if name == "modern" else warmup
        overrides[name] = [k for k in keys if not k.startswith("train.warmup_steps=")] + \
            [f"train.warmup_steps={own_warmup}"]
        result = train_recipe(name, args.config, [*common, *overrides[name], *budget], out)
        if result is None:
            return 1
        results[name] = result
    if args.timing_rounds:
        print(f"timing {args.timing_steps} steps of each recipe, round-robin, {args.timing_rounds} rounds", flush=True)
        configs = {name: load_config(args.config, [*common, *overrides[name], *budget]) for name in recipes}
        for name, seconds in interleaved_step_seconds(configs, args.timing_rounds, args.timing_steps).items():
            results[name]["step_s"] = seconds

    lines = table(results)
    print("\n".join(lines))
    plot(results, out / "recipe.png")
    (out / "recipe.json").write_text(json.dumps(
        {"config": args.config, "modern_config": args.modern_config, "steps": steps, "eval_interval": eval_interval,
         "common_overrides": common, "document_mask": has_document_mask(), "results": results}, indent=2) + "\n")
    print(f"plot: {out / 'recipe.png'}")
    return 0 if all(math.isfinite(r["final_loss"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
