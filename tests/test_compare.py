"""`codeparrot compare`: real tiny runs side by side (validation loss, HumanEval, in-training pass@1), the PNG, and
the refusal of numbers made with different settings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codeparrot.compare import differing, score_text

from conftest import SUBPROCESS_ENV, build_training_corpus, run_cli, write_jsonl
from test_humaneval import SMALL_PROBLEMS, TINY


def test_differing_names_only_the_keys_that_differ():
    a = {"n": 1, "stop": ["\ndef"], "temperature": 0.2}
    assert differing({"a": a, "b": {**a}}) == []
    assert differing({"a": a, "b": {**a, "temperature": 0.0}, "c": {**a, "extra": 1}}) == ["extra", "temperature"]


def test_an_evalplus_cell_shows_base_and_plus():
    assert score_text({"scores": {"base": {"pass@1": 0.5}, "plus": {"pass@1": 0.25}}}) == "0.5000/0.2500"
    assert score_text({"scores": {"pass@1": 0.125}}) == "0.1250" and score_text(None) == "-"
    assert score_text({"scores": {"base": None, "plus": {"pass@1": 0.5}}}) == "-/0.5000"  # a Hub copy: plus only


def test_in_training_pass_at_1_settings_are_the_probes_prompt_and_test_keys(tmp_path):
    """What decides eval.code_benchmark's number: its own keys and the humaneval keys the probe uses (e.g. MBPP's
    prompt), not those that do not apply to the benchmark."""
    from codeparrot.compare import training_pass_settings
    from codeparrot.config import load_config

    def settings(*overrides: str) -> dict:
        ckpt = tmp_path / str(len(list(tmp_path.iterdir())))
        ckpt.mkdir()
        load_config(None, ["eval.code_benchmark=mbpp", "eval.code_benchmark_limit=20", *overrides]).save(
            ckpt / "config.yaml")
        return training_pass_settings(ckpt)

    zero_shot, three_shot = settings(), settings("humaneval.mbpp_prompt=3-shot")
    assert differing({"a": zero_shot, "b": three_shot}) == ["mbpp_prompt"]
    assert zero_shot["limit"] == 20 and zero_shot["n"] == 1 and zero_shot["temperature"] == 0.0
    assert differing({"a": zero_shot, "b": settings("eval.code_benchmark_limit=10")}) == ["limit"]
    assert "mbpp_prompt" not in settings("eval.code_benchmark=humaneval-plus")


def compare_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codeparrot", "compare", *args], env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)


def probe(problems: Path) -> list[str]:
    """eval.code_benchmark on the small problems, with the humaneval command's budget below."""
    return ["eval.code_benchmark=humaneval", f"eval.code_benchmark_problems={problems}", "eval.code_benchmark_limit=2",
            "eval.code_benchmark_max_new_tokens=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny runs of 3 steps (learning rates 3e-3 and 1e-2) on the same data, each scored on 2 small problems;
    run a tracks greedy pass@1 on them during training (eval.code_benchmark)."""
    root = build_training_corpus(tmp_path_factory.mktemp("compare"), TINY, pretokenize=False)
    problems = write_jsonl(root / "problems.jsonl", SMALL_PROBLEMS)
    out = []
    for name, lr in (("a", "3e-3"), ("b", "1e-2")):
        run_cli("train", f"paths.workdir={root}", *TINY, f"train.run_name={name}", f"train.learning_rate={lr}",
                "train.trackers=[]", *(probe(problems) if name == "a" else ()))
        ckpt = root / "runs" / name / "step-3"
        run_cli("humaneval", "--checkpoint", str(ckpt), f"humaneval.problems={problems}", "humaneval.limit=2",
                "humaneval.n=1", "humaneval.temperature=0", "humaneval.max_new_tokens=8", "humaneval.ks=[1]")
        out.append(root / "runs" / name)
    return out[0], out[1]


@pytest.mark.slow
def test_compare_prints_one_table_and_draws_the_curves(runs, tmp_path):
    a, b = runs
    p = compare_cli(str(a), str(b / "step-3"), "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    head = lines[lines.index("== compare ==") + 1]
    assert head.split()[:3] == ["checkpoint", "tokens", "val"] and "humaneval" in head
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("a/step-3", "b/step-3"))}
    assert set(rows) == {"a/step-3", "b/step-3"}
    for name, run in (("a/step-3", a), ("b/step-3", b)):
        state = json.loads((run / "step-3" / "trainer_state.json").read_text())
        report = json.loads((run / "humaneval" / "step-3" / "pass_at_k.json").read_text())
        assert float(rows[name][2]) == pytest.approx(state["history"][-1]["loss"], abs=5e-5)
        assert float(rows[name][3]) == pytest.approx(report["pass@1"], abs=5e-5)
    assert any(line.startswith("  humaneval: ") and "temperature=0.0" in line for line in lines)
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [t["name"] for t in saved["targets"]] == ["a/step-3", "b/step-3"]


@pytest.mark.slow
def test_compare_refuses_numbers_made_with_other_settings(runs, tmp_path):
    """A third run evaluated on another budget (eval.max_batches) and scored at another temperature is refused,
    and the message names both settings; the two comparable runs still compare."""
    a, b = runs
    root = a.parents[1]
    problems = root / "problems.jsonl"
    run_cli("train", f"paths.workdir={root}", *TINY, "train.run_name=c", "eval.max_batches=2", "train.trackers=[]")
    run_cli("humaneval", "--checkpoint", str(root / "runs" / "c" / "step-3"), f"humaneval.problems={problems}",
            "humaneval.limit=2", "humaneval.n=1", "humaneval.temperature=0.5", "humaneval.max_new_tokens=8",
            "humaneval.ks=[1]")
    p = compare_cli(str(a), str(b), str(root / "runs" / "c"), "--out", str(tmp_path))
    assert p.returncode == 2 and p.stdout == ""
    message = p.stderr.strip()
    assert message.count("\n") == 0 and "not comparable" in message
    assert "validation loss (max_batches)" in message and "humaneval (temperature)" in message
    assert not (tmp_path / "compare.png").exists()
    assert compare_cli(str(a), str(b), "--out", str(tmp_path)).returncode == 0


def test_compare_needs_two_targets_and_real_runs(tmp_path):
    p = compare_cli(str(tmp_path))
    assert p.returncode == 2 and "at least two" in p.stderr
    p = compare_cli(str(tmp_path), str(tmp_path))
    assert p.returncode == 2 and "neither a run" in p.stderr


# --- pass@1 during training (eval.code_benchmark) -------------------------------------------------

def metric_rows(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.slow
def test_training_tracks_the_pass_at_1_that_humaneval_gives(runs):
    """At every evaluation (steps 0 and 3) the run logs eval/humaneval_pass@1; at step 3 its completions are the
    greedy samples `codeparrot humaneval` draws from that checkpoint and its value their pass@1; the trainer state,
    the model card and loss.png carry it."""
    from codeparrot.config import load_config
    from codeparrot.hub import model_card
    from codeparrot.plots import loss_figure, read_metrics

    a, _ = runs
    logged = metric_rows(a, "eval/humaneval_pass@1")
    assert [step for step, _ in logged] == [0, 3]
    probed = [json.loads(line) for line in (a / "code_benchmark" / "humaneval" / "step-3.jsonl").read_text()
              .splitlines()]
    sampled = [json.loads(line) for line in (a / "humaneval" / "step-3" / "results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["completion"], r["passed"]) for r in probed] == \
        [(r["task_id"], r["completion"], r["passed"]) for r in sampled]
    assert logged[-1][1] == sum(r["passed"] for r in probed) / 2
    state = json.loads((a / "step-3" / "trainer_state.json").read_text())
    assert state["history"][-1]["humaneval_pass@1"] == logged[-1][1]
    card = model_card(load_config(None, []), a / "step-3")
    assert f"| humaneval greedy pass@1 (step 3, during training) | {logged[-1][1]:.4f} |" in card
    assert [ax.get_ylabel() for ax in loss_figure(read_metrics(a), "a").axes if ax.get_ylabel()] == \
        ["loss", "pass@1 (greedy)"]


@pytest.mark.slow
def test_two_processes_score_step_0_as_one(runs, tmp_path):
    """Under accelerate launch the two processes split the problems; at step 0 (the same initial weights) the
    completions and pass@1 equal the one-process run's."""
    from conftest import free_port

    a, _ = runs
    root = a.parents[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(free_port()), "-m"]
    p = subprocess.run([*launcher, "codeparrot", "train", f"paths.workdir={root}", *TINY, "train.run_name=two",
                        "train.learning_rate=3e-3", "train.trackers=[]", *probe(root / "problems.jsonl")],
                       env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "processes: 2" in p.stdout
    two = root / "runs" / "two"
    assert (two / "code_benchmark" / "humaneval" / "step-0.jsonl").read_text() == \
        (a / "code_benchmark" / "humaneval" / "step-0.jsonl").read_text()
    assert metric_rows(two, "eval/humaneval_pass@1")[0] == metric_rows(a, "eval/humaneval_pass@1")[0]


@pytest.mark.slow
def test_a_machine_without_a_sandbox_stops_before_step_0(runs, tmp_path):
    a, _ = runs
    root = a.parents[1]
    env = {**SUBPROCESS_ENV, "PATH": str(tmp_path / "empty")}  # no bwrap, prlimit or setpriv
    p = subprocess.run([sys.executable, "-m", "codeparrot", "train", f"paths.workdir={root}", *TINY,
                        "train.run_name=nosandbox", "train.trackers=[]", *probe(root / "problems.jsonl")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no sandbox here" in p.stderr, p.stderr[-2000:]
    assert not list((root / "runs" / "nosandbox").glob("step-*"))
    assert not (root / "runs" / "nosandbox" / "logs" / "metrics.jsonl").exists()
