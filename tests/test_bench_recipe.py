"""scripts/bench_recipe.py trains the GPT-2 and the modern recipe on one small corpus and prints its table and plot
(the figures are not judged: a few steps of a tiny model)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SUBPROCESS_ENV, build_training_corpus

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "bench_recipe.py"
ROW = re.compile(r"^(?P<label>.+?)\s+(?P<loss>\d+\.\d+)\s+(?P<frac>\d+\.\d+|not reached)\s+(?P<wall>\d+\.\d+)x\s+"
                 r"(?:(?P<step_ms>\d+) ms = (?P<step>\d+\.\d+)x)$")
# The corpus's keys (tokenizer and token shards) and a tiny model: the base config of both the build and the bench.
CORPUS = {"corpus": {"valid_fraction": 0.3}, "tokenizer": {"vocab_size": 400, "n_examples": 200},
          "data": {"seq_length": 32, "pretokenized": True}}
BASE = {**CORPUS, "model": {"preset": "tiny", "n_embd": 32},
        "train": {"micro_batch_size": 4, "learning_rate": 0.003, "warmup_steps": 2, "mixed_precision": "no",
                  "trackers": []},
        "eval": {"batch_size": 4, "max_batches": 2, "max_new_tokens": 8}}


@pytest.mark.slow
def test_bench_recipe_prints_rows_and_plot(tmp_path):
    work = tmp_path / "work"
    build_training_corpus(work, [f"{s}.{k}={str(v).lower() if isinstance(v, bool) else v}"
                                 for s, kv in CORPUS.items() for k, v in kv.items()], pretokenize=True)
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"paths": {"workdir": str(work)}, **BASE}))
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config),
         "--modern-config", str(ROOT / "configs" / "tiny-modern.yaml"), "--recipes", "gpt2,modern",
         "--steps", "6", "--eval-interval", "2", "--out", str(out), "--timing-rounds", "2",
         "--timing-steps", "1"],
        capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m["label"]: m for m in (ROW.match(line) for line in proc.stdout.splitlines()) if m}
    assert set(rows) == {"gpt2 (AdamW, cosine)", "modern (full recipe)"}, proc.stdout
    gpt2 = rows["gpt2 (AdamW, cosine)"]
    # the base of every ratio: it reaches its own loss
    assert float(gpt2["frac"]) <= 1 and gpt2["wall"] == "1.00" and gpt2["step"] == "1.00"
    for m in rows.values():
        assert 0 < float(m["loss"]) < 20 and float(m["wall"]) > 0 and int(m["step_ms"]) > 0
        assert m["frac"] == "not reached" or float(m["frac"]) >= 0
    assert (out / "recipe.png").stat().st_size > 0
    assert (out / "runs" / "modern" / "logs" / "metrics.jsonl").exists()


def test_bench_recipe_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--recipes" in proc.stdout and "--preset" in proc.stdout
