"""`pipeline`'s skips after train: evaluate and humaneval results are keyed on the checkpoint's weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SUBPROCESS_ENV, build_training_corpus, summaries, write_jsonl

TINY = ["tokenizer.vocab_size=400", "tokenizer.n_examples=200", "data.seq_length=96", "data.num_of_sequences=8",
        "model.preset=tiny", "model.n_head=2", "model.n_embd=32", "train.micro_batch_size=4", "train.warmup_steps=1",
        "train.max_steps=3", "train.save_interval=3", "train.eval_interval=3", "train.mixed_precision=no",
        "eval.batch_size=4", "eval.max_batches=1", "corpus.valid_fraction=0.3"]
PROBLEMS = [
    {"task_id": "Small/0", "prompt": 'def add(a, b):\n    """Sum of a and b."""\n', "entry_point": "add",
     "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n"},
]


def pipeline(root: Path, *overrides: str) -> dict[str, dict[str, str]]:
    """`codeparrot pipeline` on the prepared corpus under `root` (train, evaluate, humaneval): its summaries."""
    cmd = [sys.executable, "-m", "codeparrot", "pipeline", f"paths.workdir={root}", "corpus.source=path", *TINY,
           "eval.humaneval=true", f"humaneval.problems={root / 'problems.jsonl'}", "humaneval.n=2",
           "humaneval.batch_size=2", "humaneval.max_new_tokens=8", *overrides]
    p = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return summaries(p.stdout)


@pytest.mark.slow
def test_a_checkpoint_retrained_under_the_same_step_is_evaluated_and_scored_again(tmp_path):
    """Retrained at the same step with another shape, step-3 holds other weights: evaluate and humaneval ran again
    (they skipped on the step name and showed the old model's numbers), the old results moved aside; unchanged
    weights are still skipped."""
    root = build_training_corpus(tmp_path, TINY, pretokenize=False)
    write_jsonl(root / "problems.jsonl", PROBLEMS)
    run = root / "runs" / "default"
    first = pipeline(root, "model.n_layer=2")
    assert first["evaluate"]["loss"] == first["train"]["best_val_loss"]
    again = pipeline(root, "model.n_layer=1", "train.resume=none")
    assert again["train"]["skipped"] == "False" and again["train"]["step"] == "3"
    assert again["evaluate"].get("skipped") is None and again["humaneval"].get("skipped") is None
    assert again["evaluate"]["loss"] == again["train"]["best_val_loss"] != first["evaluate"]["loss"]
    evals = sorted((p.name for p in (run / "eval").iterdir()), key=len)
    assert len(evals) == 2 and evals[0] == "step-3.json" and evals[1].startswith("step-3.replaced-")
    aside = [p for p in (run / "humaneval").iterdir() if p.name.startswith("step-3.replaced-")]
    assert len(aside) == 1 and (aside[0] / "pass_at_k.json").is_file()
    recorded = [json.loads(p.read_text())["checkpoint_fingerprint"]["sha256"]
                for p in (run / "eval" / evals[0], run / "eval" / evals[1], aside[0] / "pass_at_k.json",
                          run / "humaneval" / "step-3" / "pass_at_k.json")]
    assert recorded[1] == recorded[2] != recorded[0] == recorded[3]
    third = pipeline(root, "model.n_layer=1")  # the same weights: both skip, nothing more moved aside
    assert third["evaluate"]["skipped"] == third["humaneval"]["skipped"] == "True"
    assert third["evaluate"]["loss"] == again["evaluate"]["loss"] and len(list((run / "eval").iterdir())) == 2
