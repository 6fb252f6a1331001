"""`loss.png` of a run: train and validation loss against optimizer steps, with tokens seen on a second axis."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of `run/logs/metrics.jsonl` by step; a resumed run logs some steps twice, and the last one wins."""
    path = run / "logs" / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} is not a training run directory (runs/<run>)")
    by_step: dict[tuple[int, bool], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a crash
            continue
        if isinstance(row, dict) and "step" in row:
            by_step[row["step"], "eval/loss" in row] = row
    return [by_step[k] for k in sorted(by_step)]


def train_curve(rows: list[dict[str, Any]], x_key: str) -> list[tuple[float, float]]:
    """The train loss the run's log prints: fine-tuning's evaluator measures it on fixed train batches at each
    evaluation (step 0 included); pretraining logs the mean loss of each window of steps."""
    key = "eval/train_loss" if any("eval/train_loss" in r for r in rows) else "train/loss"
    return [(r[x_key], r[key]) for r in rows if key in r]


def add_tokens_axis(ax, rows: list[dict[str, Any]], x_key: str) -> None:
    """A top axis of tokens seen, tied to the bottom one by tokens = x * (tokens per x unit) of the last logged
    point: linear both ways, so it is exact at 0 and at the end and never clamps inside the plot's margins."""
    seen = sorted((r[x_key], r["train/tokens_seen"]) for r in rows if r.get("train/tokens_seen"))
    if not seen or seen[-1][0] <= 0:
        return
    rate = seen[-1][1] / seen[-1][0]
    top = ax.secondary_xaxis("top", functions=(lambda x: x * rate, lambda tokens: tokens / rate))
    # fine-tuning batches hold different numbers of real tokens: there the axis is the run's mean rate
    exact = all(abs(t - x * rate) <= 0.5 for x, t in seen)
    top.set_xlabel("tokens seen" if exact else "tokens seen (at the run's mean rate)")


def loss_figure(rows: list[dict[str, Any]], title: str):
    """The figure: train and validation loss against steps (against epochs for fine-tuning runs, whose rows carry
    train/epoch); tokens seen on the top axis."""
    from matplotlib.figure import Figure

    x_key = "train/epoch" if any("train/epoch" in r for r in rows) else "step"
    train = train_curve(rows, x_key)
    valid = [(r[x_key], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if not train and not valid:
        raise ValueError("no train/loss or eval/loss in the run's metrics: nothing to plot")
    passes = pass_curves(rows, x_key)
    fig = Figure(figsize=(12, 4.5) if passes else (7, 4.5))
    ax = fig.add_subplot(1, 2 if passes else 1, 1)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set(xlabel="epoch" if x_key != "step" else "step", ylabel="loss", title=title)
    ax.legend()
    add_tokens_axis(ax, rows, x_key)
    if passes:  # eval.code_benchmark: greedy pass@1 at each evaluation, beside the loss it may part ways with
        right = fig.add_subplot(1, 2, 2, sharex=ax)
        for name, curve in passes.items():
            right.plot(*zip(*curve), "o-", label=name)
        top = max(v for curve in passes.values() for _, v in curve)
        right.set(xlabel=ax.get_xlabel(), ylabel="pass@1 (greedy)", title="code benchmark during training",
                  ylim=(0, max(0.05, min(1.0, top * 1.15))))  # a share: never below 0, room above the best
        right.legend()
        add_tokens_axis(right, rows, x_key)
    fig.tight_layout()
    return fig


def pass_curves(rows: list[dict[str, Any]], x_key: str) -> dict[str, list[tuple[float, float]]]:
    """{benchmark: [(x, pass@1)]} of the eval/<benchmark>_pass@1 values the run logged (eval.code_benchmark)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key.startswith("eval/") and key.endswith("_pass@1"):
                out.setdefault(key[len("eval/"):-len("_pass@1")], []).append((r[x_key], value))
    return out


def plot_run(run: str | Path, output: str | Path | None = None) -> Path:
    """Draw `loss.png` for a run directory (pretraining or fine-tuning); its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    run = Path(run)
    out = Path(output) if output else run / "loss.png"
    FigureCanvasAgg(loss_figure(read_metrics(run), f"{run.name}: loss")).print_png(str(out))
    log.info("plot: wrote %s", out)
    return out
