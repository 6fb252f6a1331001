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


def loss_figure(rows: list[dict[str, Any]], title: str):
    """The figure: train and validation loss against steps (against epochs for fine-tuning runs, whose rows carry
    train/epoch); tokens seen on the top axis."""
    from matplotlib.figure import Figure

    x_key = "train/epoch" if any("train/epoch" in r for r in rows) else "step"
    train = [(r[x_key], r["train/loss"]) for r in rows if "train/loss" in r]
    valid = [(r[x_key], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if not train and not valid:
        raise ValueError("no train/loss or eval/loss in the run's metrics: nothing to plot")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set(xlabel="epoch" if x_key != "step" else "step", ylabel="loss", title=title)
    ax.legend()
    seen = sorted({(r[x_key], r["train/tokens_seen"]) for r in rows if r.get("train/tokens_seen")})
    if seen:  # tokens grow with steps (not always linearly: fine-tuning batches differ): interpolate both ways
        import numpy as np

        # from 0, and on past the last point at the run's own rate, so that ticks beyond the data stay in place
        xs = np.array([0.0] + [x for x, _ in seen] + [seen[-1][0] * 10])
        ts = np.array([0.0] + [t for _, t in seen] + [seen[-1][1] * 10], dtype=float)
        top = ax.secondary_xaxis("top", functions=(lambda v: np.interp(v, xs, ts), lambda v: np.interp(v, ts, xs)))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    return fig


def plot_run(run: str | Path, output: str | Path | None = None) -> Path:
    """Draw `loss.png` for a run directory (pretraining or fine-tuning); its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    run = Path(run)
    out = Path(output) if output else run / "loss.png"
    FigureCanvasAgg(loss_figure(read_metrics(run), f"{run.name}: loss")).print_png(str(out))
    log.info("plot: wrote %s", out)
    return out
