"""`codeparrot compare`: runs or checkpoints side by side, validation loss and every code benchmark scored on each.

Each target is a run (`runs/<run>`: its latest checkpoint) or a checkpoint (`runs/<run>/step-N`). The table gives,
per target, the validation loss `evaluate` wrote (else the run's last in-training evaluation at that step) and every
`humaneval` result of that checkpoint (any benchmark or task: `pass_at_k.json`), plus the pass@1 tracked during
training (`eval/<benchmark>_pass@1`). `compare.png` draws the runs' curves, one set of axes per metric.

A number is compared only with numbers made the same way: validation losses need the same tokenizer, validation
data, context and evaluation budget; benchmark scores the same sampling settings. Otherwise the command stops and
names the settings that differ (what `results.py` keys on, the checkpoint itself, is of course left out).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config
from .plots import read_metrics
from .results import validation_settings

log = logging.getLogger(__name__)

# Benchmark settings that do not change a score: how the work was spread, and which k were reported.
NOT_SCORE_SETTINGS = {"workers", "ks", "checkpoint", "checkpoint_sha256"}
PASS_PREFIX, PASS_SUFFIX = "eval/", "_pass@1"


@dataclass
class Target:
    """One column of the comparison: a checkpoint of a run and the numbers found for it."""

    name: str
    run: Path
    step: int
    tokens: float | None = None
    loss: float | None = None
    loss_settings: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # benchmark label -> pass@k, settings
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # metric -> (tokens, value)


def resolve(target: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run (its latest step-N) or of a step-N checkpoint."""
    path = Path(target)
    if path.name.startswith("step-") and (path / "config.json").is_file():
        return path.parent, path
    steps = sorted(path.glob("step-*/config.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not steps:
        raise FileNotFoundError(f"{path} is neither a run (runs/<run> with step-N checkpoints) nor a step-N "
                                "checkpoint")
    return path, steps[-1].parent


def loss_settings(run: Path, checkpoint: Path, evaluated: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint's validation loss depends on: as `evaluate` recorded it, else (the in-training loss) from
    the checkpoint's config, its paths resolved from here as every command resolves them, and the run's process
    count."""
    if evaluated and isinstance(evaluated.get("settings"), dict):
        return evaluated["settings"]
    ranks = run / "logs" / "rank0.json"
    processes = json.loads(ranks.read_text()).get("world_size", 1) if ranks.is_file() else 1
    return validation_settings(load_config(checkpoint / "config.yaml"), checkpoint, processes)


def training_pass_settings(checkpoint: Path) -> dict[str, Any]:
    """What the pass@1 tracked during training depends on: the probe's humaneval settings (benchmark, problems,
    limit, prompt and test keys), as `humaneval` records its own, from the checkpoint's saved config."""
    import dataclasses

    from .humaneval.probe import probe_settings
    from .humaneval.run import humaneval_settings

    cfg = load_config(checkpoint / "config.yaml")
    settings = humaneval_settings(dataclasses.replace(cfg, humaneval=probe_settings(cfg)))
    return {k: v for k, v in settings.items() if k not in NOT_SCORE_SETTINGS}


def benchmark_scores(run: Path, step: int) -> dict[str, dict[str, Any]]:
    """Every humaneval result of checkpoint step-`step`: {label: {"scores", "settings", "problems"}}, the label
    being its directory under runs/<run>/humaneval/ (the benchmark or infilling task; HumanEval itself: humaneval)."""
    out = {}
    base = run / "humaneval"
    for file in sorted(base.glob(f"**/step-{step}/pass_at_k.json")):
        result = json.loads(file.read_text())
        label = "/".join(file.parent.relative_to(base).parts[:-1]) or "humaneval"
        scores = {k: v for k, v in result.items() if k.startswith("pass@") or k in ("base", "plus")}
        settings = {k: v for k, v in (result.get("settings") or {}).items() if k not in NOT_SCORE_SETTINGS}
        out[label] = {"scores": scores, "settings": settings, "problems": result.get("problems")}
    return out


def run_curves(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """A run's validation loss and in-training pass@1 against tokens seen (steps x the run's tokens per step)."""
    seen = sorted((r["step"], r["train/tokens_seen"]) for r in rows if r.get("train/tokens_seen"))
    rate = seen[-1][1] / seen[-1][0] if seen and seen[-1][0] > 0 else 1.0
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key == "eval/loss" or (key.startswith(PASS_PREFIX) and key.endswith(PASS_SUFFIX)):
                out.setdefault(key, []).append((r["step"] * rate, value))
    return out


def load_target(target: str | Path) -> Target:
    """A target's numbers: evaluate's loss (else the in-training one at its step), benchmark scores, curves."""
    run, checkpoint = resolve(target)
    step = int(checkpoint.name.split("-")[1])
    t = Target(name=f"{run.name}/{checkpoint.name}", run=run, step=step)
    rows = read_metrics(run) if (run / "logs" / "metrics.jsonl").is_file() else []
    t.curves = run_curves(rows)
    state = checkpoint / "trainer_state.json"
    t.tokens = json.loads(state.read_text()).get("tokens_seen") if state.is_file() else None
    file = run / "eval" / f"{checkpoint.name}.json"
    evaluated = json.loads(file.read_text()) if file.is_file() else None
    at_step = [r for r in rows if r["step"] == step]
    if evaluated is not None:
        t.loss = evaluated["loss"]
    elif any("eval/loss" in r for r in at_step):
        t.loss = [r["eval/loss"] for r in at_step if "eval/loss" in r][-1]
    for r in at_step:  # pass@1 tracked during training, at this checkpoint's step
        for key, value in r.items():
            if key.startswith(PASS_PREFIX) and key.endswith(PASS_SUFFIX):
                bench = key[len(PASS_PREFIX):-len(PASS_SUFFIX)]
                t.scores[f"{bench} (training)"] = {"scores": {"pass@1": value},
                                                   "settings": training_pass_settings(checkpoint)}
    t.loss_settings = loss_settings(run, checkpoint, evaluated)
    t.scores.update(benchmark_scores(run, step))
    return t


def differing(settings: dict[str, dict[str, Any]]) -> list[str]:
    """The keys whose values differ between targets' settings ({target: settings})."""
    keys = sorted({k for s in settings.values() for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]


def check_comparable(targets: list[Target]) -> None:
    """Refuse (ConfigError) numbers made with different settings, naming them and the targets."""
    problems = []
    losses = {t.name: t.loss_settings for t in targets if t.loss is not None}
    if len(losses) > 1 and (keys := differing(losses)):
        problems.append(f"validation loss ({', '.join(keys)})")
    for label in sorted({label for t in targets for label in t.scores}):
        scored = {t.name: t.scores[label]["settings"] for t in targets if label in t.scores}
        if len(scored) > 1 and (keys := differing(scored)):
            problems.append(f"{label} ({', '.join(keys)})")
    if problems:
        raise ConfigError("compare: these numbers were made with different settings, so they are not comparable: "
                          + "; ".join(problems) + ". Re-evaluate with the same settings (or compare fewer targets)")


def score_text(entry: dict[str, Any] | None) -> str:
    """A benchmark cell: pass@1, or base/plus pass@1 for EvalPlus's benchmarks; '-' when not scored."""
    if entry is None:
        return "-"
    s = entry["scores"]
    if "base" in s and "plus" in s:  # base is null for the Hub copies' merged tests: a plus score only
        base, plus = ((s[k] or {}).get("pass@1") for k in ("base", "plus"))
        return "/".join("-" if v is None else f"{v:.4f}" for v in (base, plus))
    return f"{s['pass@1']:.4f}" if "pass@1" in s else "-"


def table(targets: list[Target]) -> list[str]:
    """The printed table: a row per target; columns tokens, validation loss and each benchmark's pass@1."""
    labels = sorted({label for t in targets for label in t.scores})
    width = max(len(t.name) for t in targets)
    head = [f"{'checkpoint':{width}s}", f"{'tokens':>12s}", f"{'val loss':>9s}"] + [f"{b:>{max(13, len(b))}s}"
                                                                                   for b in labels]
    lines = [" ".join(head)]
    for t in targets:
        cells = [f"{t.name:{width}s}", f"{t.tokens:12.4g}" if t.tokens else f"{'-':>12s}",
                 f"{t.loss:9.4f}" if t.loss is not None else f"{'-':>9s}"]
        cells += [f"{score_text(t.scores.get(b)):>{max(13, len(b))}s}" for b in labels]
        lines.append(" ".join(cells))
    if any("plus" in e["scores"] for t in targets for e in t.scores.values()):
        lines.append("(EvalPlus benchmarks: base/plus pass@1)")
    return lines


def settings_lines(targets: list[Target]) -> list[str]:
    """The settings every compared number shares (they were checked equal), one line per metric."""
    lines = []
    first = next((t for t in targets if t.loss is not None), None)
    if first:
        lines.append("validation loss: " + ", ".join(f"{k}={v}" for k, v in first.loss_settings.items()))
    for label in sorted({label for t in targets for label in t.scores}):
        entry = next(t.scores[label] for t in targets if label in t.scores)
        lines.append(f"{label}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(entry["settings"].items())))
    return lines


def plot(targets: list[Target], path: Path) -> None:
    """compare.png: one panel per metric (validation loss, each in-training pass@1), every run's curve on it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = {t.run: t for t in targets}  # a run compared at two checkpoints is drawn once
    metrics = sorted({m for t in runs.values() for m in t.curves}, key=lambda m: (m != "eval/loss", m))
    if not metrics:
        raise ValueError("compare: no run has eval/loss or pass@1 in its metrics.jsonl: nothing to plot")
    fig = Figure(figsize=(6.5 * len(metrics), 4.5))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for run, t in runs.items():
            if metric in t.curves:
                ax.plot(*zip(*t.curves[metric]), "o-", markersize=3, label=run.name)
        if metric == "eval/loss":  # the compared checkpoints themselves, with the loss the table gives
            for t in targets:
                if t.loss is not None and t.tokens:
                    ax.plot(t.tokens, t.loss, "*", markersize=12, label=t.name)
        name = "validation loss" if metric == "eval/loss" else metric[len(PASS_PREFIX):]
        ax.set(xlabel="tokens seen", ylabel=name, title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def run_compare(targets: list[str], out: str | Path = ".") -> dict[str, Any]:
    """Compare the targets: check the settings agree, print-ready table lines, compare.png and compare.json."""
    if len(targets) < 2:
        raise ConfigError("compare: give at least two runs or checkpoints")
    loaded = [load_target(t) for t in targets]
    check_comparable(loaded)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(loaded, out / "compare.png")
    result = {"table": table(loaded), "settings": settings_lines(loaded),
              "targets": [{"name": t.name, "run": str(t.run), "step": t.step, "tokens": t.tokens, "loss": t.loss,
                           "scores": t.scores, "loss_settings": t.loss_settings} for t in loaded]}
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    log.debug("compare: wrote %s and %s", out / "compare.png", out / "compare.json")
    return result
