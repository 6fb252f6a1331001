"""The benchmark and comparison scripts run end to end on tiny settings (they are not timed here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
