"""Run bookkeeping: latest checkpoint, pruning, the run's identity, a checkpoint's own config."""
from __future__ import annotations

import pytest

from codeparrot.artifacts import CheckpointError
from codeparrot.config import load_config
from codeparrot.runs import Checkpointer, checkpoint_config, latest_checkpoint, training_fingerprint


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    for name in ("step-3", "step-6", "step-9.tmp", "step-12"):
        (tmp_path / name).mkdir()
    for name in ("step-3", "step-6", "step-9.tmp"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-6"  # step-12 lacks trainer_state.json
    assert latest_checkpoint(tmp_path / "missing") is None


def test_pruning_keeps_checkpoints_newer_than_the_current_step(tmp_path):
    for step in (2, 4, 6, 9):
        (tmp_path / f"step-{step}").mkdir()
    (tmp_path / "step-8.tmp").mkdir()
    Checkpointer(accelerator=None, directory=tmp_path, keep_last=2)._prune(current=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6", "step-8.tmp", "step-9"]


def test_speed_switches_are_not_part_of_the_run_identity():
    base = load_config(None, [])
    fp = training_fingerprint(base, {"clean": "c", "tokenizer": "t"})
    for override in ("model.loss_chunk_size=256", "model.gradient_checkpointing=true", "model.attention_backend=math",
                     "train.compile=true", "train.fused_adamw=false", "train.max_steps=7", "train.run_name=x"):
        assert training_fingerprint(load_config(None, [override]), {"clean": "c", "tokenizer": "t"}) == fp, override
    for override in ("train.learning_rate=0.1", "model.dropout=0.1", "data.seq_length=64", "data.num_workers=2"):
        assert training_fingerprint(load_config(None, [override]), {"clean": "c", "tokenizer": "t"}) != fp, override
    assert training_fingerprint(base, {"clean": "other", "tokenizer": "t"}) != fp


def test_a_checkpoints_own_config_comes_first_then_the_file_then_overrides(tmp_path):
    ckpt = tmp_path / "step-3"
    ckpt.mkdir()
    load_config(None, ["paths.workdir=/data/run", "eval.max_batches=7", "data.seq_length=64"]).save(
        ckpt / "config.yaml")
    cfg = checkpoint_config(ckpt)
    assert (cfg.paths.workdir, cfg.eval.max_batches, cfg.data.seq_length) == ("/data/run", 7, 64)
    extra = tmp_path / "eval.yaml"
    extra.write_text("eval:\n  max_batches: 3\n")
    cfg = checkpoint_config(ckpt, extra, ["eval.batch_size=2"])
    assert (cfg.paths.workdir, cfg.eval.max_batches, cfg.eval.batch_size) == ("/data/run", 3, 2)
    (ckpt / "config.yaml").write_text("model: [not, a, mapping]\n")
    with pytest.raises(CheckpointError, match="config.yaml"):
        checkpoint_config(ckpt)
    (ckpt / "config.yaml").unlink()  # a checkpoint from elsewhere: the file and overrides alone
    assert checkpoint_config(ckpt, None, ["eval.max_batches=5"]).eval.max_batches == 5
