"""loss.png: what the figure holds, read back from a run's metrics.jsonl (a resumed run's repeated steps too)."""
from __future__ import annotations

import json

import pytest

from codeparrot.plots import loss_figure, plot_run, read_metrics

from conftest import run_cli


def write_metrics(run, rows) -> None:
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "tr')


def test_loss_figure_has_train_and_validation_against_steps_and_tokens(tmp_path):
    rows = [{"step": 0, "eval/loss": 9.0}]
    rows += [{"step": s, "train/loss": 8.0 - s / 10, "train/tokens_seen": 64 * s} for s in (2, 4, 6)]
    rows += [{"step": 4, "train/loss": 7.5, "train/tokens_seen": 256}]  # logged again after a resume: this one wins
    rows += [{"step": 6, "eval/loss": 7.0}]
    write_metrics(tmp_path / "run", rows)
    metrics = read_metrics(tmp_path / "run")  # the cut-off last line is ignored
    assert [(r["step"], "eval/loss" in r) for r in metrics] == [(0, True), (2, False), (4, False), (6, False),
                                                                 (6, True)]
    fig = loss_figure(metrics, "run: loss")
    ax = fig.axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"train": ([2, 4, 6], [7.8, 7.5, 7.4]), "validation": ([0, 6], [9.0, 7.0])}
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    assert [a.get_xlabel() for a in ax.child_axes] == ["tokens seen"]
    run_cli("plot", str(tmp_path / "run"))
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_directory_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        plot_run(tmp_path)
