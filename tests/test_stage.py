"""The Stage contract: skip when up to date, rebuild on a change of config or input, stage atomically, and declare
every config key a stage's build reads (its identity covers all that shapes the artifact)."""
from __future__ import annotations

import copy
import errno
import json
from pathlib import Path
from typing import Any

import pytest

from codeparrot.artifacts import DiskFull, read_manifest
from codeparrot.config import RUNTIME_KEYS, SECTIONS, Config, load_config
from codeparrot.pipeline import STEPS
from codeparrot.stage import Stage
from codeparrot.tokenizer import run_train_tokenizer


def _write_vocab(cfg: Config, tmp: Path) -> dict[str, Any]:
    """A toy build: the tokenizer's vocab size and the clean artifact's first line, one file."""
    source = (cfg.paths.resolve("clean") / "data.txt").read_text().splitlines()[0]
    (tmp / "out.json").write_text(json.dumps({"vocab": cfg.tokenizer.vocab_size, "source": source}))
    return {"vocab": cfg.tokenizer.vocab_size}


TOY = Stage(name="toy", output="tokens", keys=("tokenizer.vocab_size", "data"), inputs=("clean",),
            build=_write_vocab)


@pytest.fixture
def toy_cfg(tmp_path) -> Config:
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "data.txt").write_text("first\n")
    return load_config(None, [f"paths.workdir={tmp_path}"])


def test_runs_then_skips_then_reruns_on_a_declared_key_or_input(toy_cfg, tmp_path):
    first = TOY.run(toy_cfg)
    assert first["skipped"] is False and first["vocab"] == toy_cfg.tokenizer.vocab_size
    out = tmp_path / "tokens"
    manifest = read_manifest(out)
    assert manifest["stage"] == "toy" and set(manifest["inputs"]) == {"clean"}
    assert manifest["config"]["tokenizer"] == {"vocab_size": toy_cfg.tokenizer.vocab_size}
    assert "pretokenize_num_proc" not in manifest["config"]["data"]  # a runtime key: not in the identity
    assert (out / "config.yaml").is_file()
    assert TOY.run(toy_cfg)["skipped"] is True

    runtime = copy.deepcopy(toy_cfg)
    runtime.data.pretokenize_num_proc = 7
    assert TOY.run(runtime)["skipped"] is True
    undeclared = copy.deepcopy(toy_cfg)
    undeclared.tokenizer.min_frequency += 1  # the toy does not read it
    assert TOY.run(undeclared)["skipped"] is True

    changed = copy.deepcopy(toy_cfg)
    changed.data.seq_length += 1
    assert TOY.run(changed)["skipped"] is False
    (tmp_path / "clean" / "data.txt").write_text("second\n")  # a changed input (a foreign one: no manifest)
    assert TOY.run(changed)["skipped"] is False
    assert json.loads((out / "out.json").read_text())["source"] == "second"


def test_missing_input_names_its_path_and_producer(tmp_path):
    cfg = load_config(None, [f"paths.workdir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"clean not found; run `codeparrot prepare` first"):
        TOY.run(cfg)
    assert not (tmp_path / "tokens").exists()


def test_failed_build_leaves_the_previous_artifact_and_no_staging(toy_cfg, tmp_path):
    TOY.run(toy_cfg)
    before = (tmp_path / "tokens" / "out.json").read_bytes()

    def fail(cfg: Config, tmp: Path) -> dict[str, Any]:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("interrupted")

    changed = copy.deepcopy(toy_cfg)
    changed.tokenizer.vocab_size += 1
    with pytest.raises(RuntimeError):
        Stage("toy", "tokens", TOY.keys, fail, TOY.inputs).run(changed)
    assert (tmp_path / "tokens" / "out.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "tokens"]


def test_a_full_disk_becomes_one_error_naming_the_artifact(toy_cfg, tmp_path):
    def full(cfg: Config, tmp: Path) -> dict[str, Any]:
        (tmp / "part").write_text("x")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write through gzip or numpy: no filename
        except OSError as e:
            raise RuntimeError("a worker failed") from e  # as a pool might wrap it

    with pytest.raises(DiskFull) as info:
        Stage("toy", "tokens", TOY.keys, full, TOY.inputs).run(toy_cfg)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]


# --- every stage declares what it reads -----------------------------------------------------------

class _Reads:
    """A config (or one of its sections) that records every `section.key` read through it."""

    def __init__(self, target: Any, reads: set[str], section: str | None = None):
        self._target, self._reads, self._section = target, reads, section

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if self._section is None:
            return _Reads(value, self._reads, name) if name in SECTIONS and name != "paths" else value
        self._reads.add(f"{self._section}.{name}")
        return value


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return key in RUNTIME_KEYS or key in declared or key.split(".")[0] in declared


@pytest.fixture(scope="module")
def stage_inputs(trained_tokenizer, stdlib_root) -> Config:
    """A config whose raw/, clean/ and tokenizer/ exist (the session's fixtures), with roots for export-local."""
    cfg = copy.deepcopy(trained_tokenizer[0])
    cfg.corpus.local_roots = [str(stdlib_root)]
    cfg.corpus.num_proc = cfg.data.pretokenize_num_proc = 1  # builds read the config in this process
    return cfg


@pytest.mark.parametrize("stage", [s for s in STEPS if isinstance(s, Stage)], ids=lambda s: s.name)
def test_a_stage_reads_only_the_keys_it_declares(stage, stage_inputs, tmp_path):
    reads: set[str] = set()
    proxy = _Reads(stage_inputs, reads)
    if stage.extra_inputs:
        stage.extra_inputs(proxy)
    (tmp_path / "out").mkdir()
    counts = stage.build(proxy, tmp_path / "out")
    assert counts and reads, "the build read no config: the proxy is not in the way"
    undeclared = sorted(k for k in reads if not _covered(k, stage.keys))
    assert not undeclared, f"{stage.name} reads {undeclared} but does not declare them in Stage.keys"


def test_sequence_length_does_not_shape_the_tokenizer(trained_tokenizer, tmp_path):
    """The tokenizer knows no sequence length (each checkpoint writes its model's), so changing it redoes nothing."""
    base, _ = trained_tokenizer
    cfg = copy.deepcopy(base)
    cfg.paths.tokenizer = str(tmp_path / "tokenizer")
    assert run_train_tokenizer(cfg)["skipped"] is False
    cfg.data.seq_length = base.data.seq_length * 2
    assert run_train_tokenizer(cfg)["skipped"] is True
    saved = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert "model_max_length" not in saved
