"""The benchmark and comparison scripts run end to end on tiny settings (they are not timed here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codeparrot.sandbox import detect_mechanism

from conftest import SUBPROCESS_ENV

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.mark.slow
def test_bench_train_runs_ours_and_the_reference_on_token_shards(trained_tokenizer):
    from codeparrot.data.pretokenize import run_pretokenize

    cfg, _ = trained_tokenizer
    run_pretokenize(cfg)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_train.py"), "--tokens", str(cfg.paths.resolve("tokens")),
         "--preset", "tiny", "--micro-batch", "2", "--seq", "32", "--vocab", "600", "--steps", "2", "--warmup", "1",
         "--workers", "0", "--baseline", "model.n_embd=32", "model.n_head=2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("codeparrot", "reference"))]
    assert len(rows) == 2
    assert float(rows[0].split()[1].replace(",", "")) > 0  # tokens/s of our setup
    assert any(line.startswith("speed-up over the reference") for line in lines)


def _metrics(run: Path, losses: dict[int, float]) -> None:
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train/loss": v}) + "\n" for s, v in losses.items()))


@pytest.mark.parametrize("offset, code", [(0.01, 0), (0.2, 1)])
def test_compare_runs_flags_curves_that_differ(tmp_path, offset, code):
    _metrics(tmp_path / "a", {1: 9.0, 2: 8.0, 3: 7.5})
    _metrics(tmp_path / "b", {1: 9.0, 2: 8.0 + offset, 3: 7.5})
    proc = subprocess.run([sys.executable, str(SCRIPTS / "compare_runs.py"), str(tmp_path / "a"),
                           str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert f"largest difference {offset:.4f}" in proc.stdout


@pytest.mark.slow
def test_bench_generate_times_three_samplers_and_both_sandboxes():
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_generate.py"), "--preset", "tiny", "--new-tokens", "6",
         "--old-new-tokens", "2", "--repeats", "1", "--batches", "3", "--programs", "4", "--threads", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("3 ")]
    assert len(rows) == 2  # random weights, then the peaked copy
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # ours, transformers, old
    assert "same verdict on every program: True (2 passed)" in proc.stdout


def _numbers(figures: dict, *keys: str) -> list[float]:
    """The figures at `keys` (dotted paths into nested dicts)."""
    out = []
    for key in keys:
        value = figures
        for part in key.split("."):
            value = value[part]
        out.append(value)
    return out


@pytest.mark.slow  # 30 s: every step of the GPU check at a tiny size, on a CPU
def test_gpu_check_dry_run_writes_every_step_with_its_figures(tmp_path):
    """`gpu_check.sh --dry-run` runs every step of the GPU check on the CPU with tiny shapes, into one JSON file."""
    out = tmp_path / "gpu_check.json"
    # the random-weights model's samples run unisolated only where this machine has no sandbox at all
    unsandboxed = ["--allow-unsandboxed"] if detect_mechanism() == "none" else []
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run", "--out", str(out), *unsandboxed],
                          env={**SUBPROCESS_ENV, "PY": sys.executable}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))  # strict JSON
    assert report["mode"] == "dry-run" and report["ok"] is True and report["failed"] == []
    steps = report["steps"]
    assert list(steps) == ["env", "data", "gpu_tests", "train_small", "train_large", "sampling", "humaneval"]
    for name, step in steps.items():
        assert step["ok"] is True and step["error"] is None and step["seconds"] > 0, (name, step)
    f = {name: step["figures"] for name, step in steps.items()}
    assert f["env"]["cuda"] is False  # the dry run hides any GPU
    assert f["data"]["train_tokens"] > 0 and 0 < f["data"]["vocab_size"] <= 1024
    assert f["gpu_tests"]["failed"] == f["gpu_tests"]["errors"] == 0 and f["gpu_tests"]["skipped"] > 0
    assert all(v > 0 for v in _numbers(f["train_small"], "ours_tokens_per_s", "ours_mfu", "transformers_tokens_per_s",
                                       "transformers_mfu", "speedup"))
    assert f["train_large"]["gradient_checkpointing"] is True  # configs/codeparrot.yaml's setting
    assert all(v > 0 for v in _numbers(f["train_large"], "tokens_per_s", "mfu", "loss"))
    for model in ("random", "peaked"):
        for batch in (1, 2):
            assert all(v > 0 for v in _numbers(f["sampling"][model][f"batch_{batch}"], "ours_tokens_per_s",
                                               "transformers_tokens_per_s", "ours_over_transformers"))
    he = f["humaneval"]
    assert (he["problems"], he["samples"], he["samples_per_problem"]) == (2, 4, 2)
    assert all(v > 0 for v in _numbers(he, "sampling_seconds", "scoring_seconds", "total_seconds"))
    assert "ours vs transformers" in proc.stdout and "train tiny tok/s" in proc.stdout  # the summary table
