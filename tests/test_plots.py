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


def tokens_under(fig, xs) -> list[float]:
    """The tokens the drawn top axis shows above each bottom-axis position (through the display, as a reader sees)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    (top,) = ax.child_axes
    return [float(top.transData.inverted().transform(ax.transData.transform((x, 0)))[0]) for x in xs]


def test_tokens_axis_is_tied_to_the_step_axis_exactly():
    # 2048 tokens a step; the step axis has a margin below 0 and beyond 20 (where an interpolation clamped: step 0
    # showed ~1.9k tokens and step 20 ~41k)
    rows = [{"step": 0, "eval/loss": 9.0}]
    rows += [{"step": s, "train/loss": 8.0 - s / 10, "train/tokens_seen": 2048 * s} for s in range(1, 21)]
    rows += [{"step": 20, "eval/loss": 7.0}]
    fig = loss_figure(rows, "run: loss")
    assert tokens_under(fig, [0, 10, 20]) == pytest.approx([0, 20480, 40960], abs=1e-6)
    assert fig.axes[0].child_axes[0].get_xlabel() == "tokens seen"


def test_fine_tuning_plots_the_evaluators_train_loss_from_step_0_and_mean_rate_tokens():
    per_epoch = 4
    rows = [{"step": 0, "eval/loss": 6.0, "eval/train_loss": 6.1, "train/epoch": 0.0}]
    for s in (2, 4):  # the window's per-step loss (train/loss) is another number than the evaluator's
        rows += [{"step": s, "train/loss": 9.0, "train/tokens_seen": 500 * s + 7 * (s == 2),
                  "train/epoch": s / per_epoch},
                 {"step": s, "eval/loss": 6.0 - s / 10, "eval/train_loss": 6.0 - s / 5, "train/epoch": s / per_epoch}]
    fig = loss_figure(rows, "sft: loss")
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()}
    assert lines["train"] == ([0.0, 0.5, 1.0], [6.1, 5.6, 5.2])
    # 2000 tokens in one epoch: exact at 0 and at the end, the mean rate between (batches differ in real tokens)
    assert tokens_under(fig, [0.0, 1.0]) == pytest.approx([0, 2000], abs=1e-6)
    assert fig.axes[0].child_axes[0].get_xlabel() == "tokens seen (at the run's mean rate)"


def test_pass_at_1_during_training_gets_a_second_panel(tmp_path):
    """eval.code_benchmark's eval/<benchmark>_pass@1 is drawn beside the loss, against the same steps."""
    rows = [{"step": 0, "eval/loss": 9.0, "eval/mbpp_pass@1": 0.0}]
    rows += [{"step": s, "train/loss": 8.0 - s / 10, "train/tokens_seen": 64 * s} for s in (2, 4)]
    rows += [{"step": 4, "eval/loss": 7.0, "eval/mbpp_pass@1": 0.25}]
    write_metrics(tmp_path / "run", rows)
    fig = loss_figure(read_metrics(tmp_path / "run"), "run: loss")
    loss_ax, pass_ax = [a for a in fig.axes if a.get_ylabel()]
    assert loss_ax.get_ylabel() == "loss" and pass_ax.get_ylabel() == "pass@1 (greedy)"
    assert pass_ax.get_ylim()[0] == 0 and pass_ax.get_ylim()[1] >= 0.25
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in pass_ax.get_lines()] == \
        [("mbpp", [0, 4], [0.0, 0.25])]
    plain = [{"step": 0, "eval/loss": 9.0}, {"step": 2, "train/loss": 8.0, "train/tokens_seen": 128}]
    assert len([a for a in loss_figure(plain, "t").axes if a.get_ylabel()]) == 1
