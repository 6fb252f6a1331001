"""Issue 15's measurements, each from the real commands, in one run: two training runs that differ only in
data.fim_rate (0 against the config's, 0.5 when it has none), both with quality tokens, then

1. left-to-right validation loss of both at the same steps (validation data is never FIM'd);
2. the loss of the high-quality validation files under their own token, against the low token;
3. single-line infilling pass@1 of both on the tasks derived from HumanEval's canonical solutions, and the loss of
   each task's canonical middle (then EOS) after its PSM prompt: the FIM paper's infilling loss, which still tells
   the two apart when a small model passes no task.

    python scripts/measure_conditioning.py                                   # the tiny demo (CPU)
    python scripts/measure_conditioning.py --config configs/codeparrot-small.yaml --samples 20   # at scale

Extra arguments are config overrides for every command (e.g. train.max_steps=300). The data stages are the
pipeline's (each skipped when up to date); the runs are `<run_name>-fim0` and `<run_name>-fim<rate>`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from codeparrot.config import load_config
from codeparrot.runs import latest_checkpoint


def codeparrot(*args: str) -> None:
    """One CLI command, echoed; a failure stops the measurement."""
    print("+ codeparrot " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "codeparrot", *args], check=True)


def eval_losses(run: Path) -> dict[int, float]:
    """The validation loss logged at each step of a training run."""
    out = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval/loss" in record:
            out[record["step"]] = record["eval/loss"]
    return out


def middle_loss(cfg, ckpt: Path) -> dict:
    """Mean loss per token of the canonical middles + EOS after their PSM prompts (conditioned on high quality), over
    the single-line tasks that fit the context."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from codeparrot.generate import Infill, load_checkpoint, prompt_ids, text_ids
    from codeparrot.humaneval import load_tasks

    model, tok = load_checkpoint(ckpt)
    eos = tok.token_to_id(cfg.tokenizer.eos_token)
    tasks = load_tasks(dataclasses.replace(cfg.humaneval, task="infill-single-line", limit=0))
    total, n_tokens, n_tasks = 0.0, 0, 0
    with torch.no_grad():
        for task in tasks:
            prompt = prompt_ids(tok, Infill(task["prompt"], task["suffix"]), eos, "high")
            middle = text_ids(tok, task["canonical_solution"]) + [eos]
            if len(prompt) + len(middle) > model.config.n_positions:
                continue
            logits = model(torch.tensor([prompt + middle])).logits[0, len(prompt) - 1:-1]  # [len(middle), V]
            total += F.cross_entropy(logits.float(), torch.tensor(middle), reduction="sum").item()
            n_tokens, n_tasks = n_tokens + len(middle), n_tasks + 1
    return {"loss": total / n_tokens, "tokens": n_tokens, "tasks": n_tasks}


def data_stages(cfg) -> None:
    """The pipeline's data stages (export-local when it makes the corpus, prepare, train-tokenizer, pretokenize),
    each skipped when up to date."""
    from codeparrot.logs import setup_logging
    from codeparrot.pipeline import pipeline_steps
    from codeparrot.stage import Stage

    setup_logging()
    for stage in pipeline_steps(cfg):
        if isinstance(stage, Stage) and stage.name != "sft-data":
            stage.run(cfg)


def measure_run(base: list[str], run: str, rate: str, samples: int, limit: int) -> dict:
    """Train one run, evaluate it three ways and score it on single-line infilling; its figures."""
    over = [*base, f"data.fim_rate={rate}", f"train.run_name={run}"]
    codeparrot("train", *over)
    cfg = load_config(over[1], over[2:])
    ckpt = latest_checkpoint(cfg.paths.resolve("runs") / run)
    figures = {"eval": eval_losses(ckpt.parent), "step": ckpt.name}
    for name, keys in (("own", ["eval.quality_bucket=high"]),
                       ("wrong", ["eval.quality_bucket=high", "eval.quality_token=low"])):
        codeparrot("evaluate", *over, "--checkpoint", str(ckpt), "eval.max_batches=0", *keys)
        suffix = ".quality-high" + (".token-low" if name == "wrong" else "")
        figures[name] = json.loads((ckpt.parent / "eval" / f"{ckpt.name}{suffix}.json").read_text())["loss"]
    # One greedy sample per task unless more are asked (then T=0.2, as the FIM paper samples); conditioned on the
    # high bucket, as a user would generate; a single line fits in 48 tokens.
    codeparrot("humaneval", *over, "--checkpoint", str(ckpt), "humaneval.task=infill-single-line",
               f"humaneval.limit={limit}", f"humaneval.n={samples}", "humaneval.ks=[1]", "humaneval.max_new_tokens=48",
               f"humaneval.temperature={0 if samples == 1 else 0.2}", "humaneval.quality=high")
    result = ckpt.parent / "humaneval" / "infill-single-line" / ckpt.name / "pass_at_k.json"
    figures["infill"] = json.loads(result.read_text())
    figures["middle"] = middle_loss(cfg, ckpt)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--samples", type=int, default=1, help="samples per infilling task: 1 = greedy pass@1; more: "
                   "pass@1 estimated from that many at T=0.2")
    p.add_argument("--limit", type=int, default=0, help="only the first N HumanEval problems' tasks; 0 = all 164")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = ["--config", args.config, *args.overrides]
    cfg = load_config(args.config, args.overrides)
    rate = str(cfg.data.fim_rate or 0.5)
    data_stages(cfg)
    runs = {r: measure_run(base, f"{cfg.train.run_name}-fim{r}", r, args.samples, args.limit) for r in ("0", rate)}
    a, b = runs["0"], runs[rate]
    print(f"\n== conditioning and infilling ({args.config}, {' '.join(args.overrides) or 'no overrides'}) ==")
    print(f"{'step':>6} {'LTR valid loss fim 0':>22} {'fim ' + rate:>10} {'diff':>8}")
    for step in sorted(set(a["eval"]) & set(b["eval"])):
        print(f"{step:>6} {a['eval'][step]:>22.4f} {b['eval'][step]:>10.4f} {b['eval'][step] - a['eval'][step]:>+8.4f}")
    for r, f in runs.items():
        print(f"fim {r}: high-quality valid loss, own token {f['own']:.4f}, low token {f['wrong']:.4f} "
              f"(wrong - right {f['wrong'] - f['own']:+.4f})")
    for r, f in runs.items():
        i = f["infill"]
        print(f"fim {r}: single-line infilling pass@1 {i['pass@1']:.4f} ({i['passed']} of {i['samples']} samples "
              f"passed, {i['problems']} tasks, {i['problems_skipped']} skipped: prompt too long)")
    for r, f in runs.items():
        m = f["middle"]
        print(f"fim {r}: loss of the canonical middles after their PSM prompts {m['loss']:.4f} ({m['tasks']} tasks, "
              f"{m['tokens']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
