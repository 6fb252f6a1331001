"""The typed config tree: shipped YAML files, overrides, errors, save/load."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from codeparrot.config import (
    SECTIONS, Config, ConfigError, TrainConfig, config_from_dict, load_config, parse_override,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_parses():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 3, files
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, Config)
        # every key written in the file reached the tree
        for section, values in (yaml.safe_load(f.read_text()) or {}).items():
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == value or got == float(value), (f.name, section, key, got, value)


def _common_published(cfg: Config) -> None:
    assert cfg.train.weight_decay == 0.1
    assert cfg.train.lr_schedule == "cosine"
    assert cfg.data.seq_length == 1024
    assert cfg.train.seed == 1
    assert cfg.tokenizer.vocab_size == 32768
    assert cfg.tokenizer.n_examples == 200000


def test_codeparrot_small_published_hyperparameters():
    cfg = load_config(CONFIGS / "codeparrot-small.yaml")
    _common_published(cfg)
    assert cfg.train.learning_rate == 5e-4
    assert cfg.train.warmup_steps == 2000
    assert cfg.train.micro_batch_size == 12
    assert cfg.train.gradient_accumulation_steps == 1
    assert cfg.train.max_steps == 150000
    assert cfg.train.save_interval == 15000
    assert cfg.model.preset == "small"


def test_codeparrot_large_published_hyperparameters():
    cfg = load_config(CONFIGS / "codeparrot.yaml")
    _common_published(cfg)
    assert cfg.train.learning_rate == 2e-4
    assert cfg.train.warmup_steps == 750
    assert cfg.train.micro_batch_size == 2
    assert cfg.train.gradient_accumulation_steps == 16
    assert cfg.train.max_steps == 50000
    assert cfg.model.gradient_checkpointing is True
    assert cfg.model.preset == "large"


@pytest.mark.parametrize("override, section, key, expected", [
    ("train.max_steps=7", "train", "max_steps", 7),
    ("train.learning_rate=1e-3", "train", "learning_rate", 1e-3),  # YAML 1.1 reads 1e-3 as a string
    ("train.learning_rate=0.002", "train", "learning_rate", 0.002),
    ("train.learning_rate=3", "train", "learning_rate", 3.0),  # int -> float
    ("train.compile=true", "train", "compile", True),
    ("train.compile=false", "train", "compile", False),
    ("train.trackers=tensorboard,wandb", "train", "trackers", ["tensorboard", "wandb"]),
    ("train.trackers=[wandb]", "train", "trackers", ["wandb"]),
    ("corpus.local_roots=/a/b", "corpus", "local_roots", ["/a/b"]),
    ("model.n_layer=null", "model", "n_layer", None),
    ("model.n_layer=4", "model", "n_layer", 4),
    ("train.mixed_precision=no", "train", "mixed_precision", "no"),  # a str field keeps the text, not False
    ("train.run_name=123", "train", "run_name", "123"),
    ("paths.raw=/data/export", "paths", "raw", "/data/export"),
])
def test_override_parses_to_field_type(override, section, key, expected):
    cfg = load_config(None, [override])
    got = getattr(getattr(cfg, section), key)
    assert got == expected
    assert type(got) is type(expected)


def test_defaults_and_later_overrides_win():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.max_steps=5", "train.max_steps=9"])
    assert cfg.train.max_steps == 9
    assert cfg.train.learning_rate == float(yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["train"]
                                             ["learning_rate"])  # from the file
    assert cfg.train.adam_beta2 == TrainConfig().adam_beta2  # untouched default


def test_paths_resolve_defaults_and_overrides(tmp_path):
    cfg = load_config(None, [f"paths.workdir={tmp_path}", "paths.raw=/elsewhere/raw"])
    assert cfg.paths.resolve("raw") == Path("/elsewhere/raw")
    assert cfg.paths.resolve("clean") == tmp_path / "clean"
    assert cfg.paths.resolve("tokenizer") == tmp_path / "tokenizer"


def test_unknown_section_names_valid_sections():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trian.max_steps=1"])
    msg = str(e.value)
    assert "trian" in msg
    for section in SECTIONS:
        assert section in msg


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.nope=1"])
    msg = str(e.value)
    assert "train.nope" in msg
    for key in ("max_steps", "learning_rate", "warmup_steps", "micro_batch_size"):
        assert key in msg


@pytest.mark.parametrize("override, hint", [
    ("train.max_steps=abc", "integer"),
    ("train.max_steps=1.5", "integer"),
    ("train.compile=maybe", "true or false"),
    ("train.learning_rate=fast", "number"),
    ("train.trackers={a: 1}", "list"),
    ("train.warmup_steps=[1]", "integer"),
])
def test_wrong_typed_override_raises(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert override.split("=")[0] in str(e.value)
    assert hint in str(e.value)


def test_malformed_override_raises():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("max_steps=3")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_bad_yaml_files_raise(tmp_path):
    cases = {
        "section.yaml": ("nosuch:\n  a: 1\n", "valid sections"),
        "key.yaml": ("train:\n  max_stepz: 1\n", "valid keys"),
        "type.yaml": ("train:\n  compile: maybe\n", "true or false"),
        "list.yaml": ("- a\n- b\n", "mapping"),
        "flat.yaml": ("train: 3\n", "mapping"),
    }
    for name, (text, hint) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=hint):
            load_config(tmp_path / name)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_is_equal(tmp_path):
    cfg = load_config(CONFIGS / "codeparrot.yaml", [
        "train.learning_rate=1e-5", "model.n_layer=3", "train.trackers=tensorboard,wandb",
        "corpus.local_roots=/x,/y", "train.mixed_precision=no", "train.compile=true",
    ])
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert again != Config()


def test_config_from_dict_round_trip():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.n_embd=48", "eval.max_batches=0", "train.trackers="])
    data = cfg.to_dict()
    assert data["train"]["trackers"] == []
    again = config_from_dict(data)
    assert again == cfg
    assert dataclasses.asdict(again) == data
    with pytest.raises(ConfigError, match="valid sections"):
        config_from_dict({"nosuch": {"a": 1}})
