"""The typed config tree: shipped YAML files, overrides, errors, save/load, choices, describe, identity."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from codeparrot.config import (
    _FIELDS, _HINTS, CHOICES, IDENTITY_WHEN_SET, RUNTIME_KEYS, SECTIONS, Config, ConfigError, TrainConfig,
    accumulation_steps, choice_list, config_from_dict, describe_config, identity, load_config, parse_override,
    range_text, section_summary,
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
    assert cfg.train.global_batch_size == 192  # 12 x 16 GPUs, published; derived on any GPU count
    assert accumulation_steps(cfg.train, 16) == 1 and accumulation_steps(cfg.train, 1) == 16
    assert cfg.data.pretokenized is True  # GPU configs read token shards
    assert cfg.train.max_steps == 150000
    assert cfg.train.save_interval == 15000
    assert cfg.model.preset == "small"


def test_codeparrot_large_published_hyperparameters():
    cfg = load_config(CONFIGS / "codeparrot.yaml")
    _common_published(cfg)
    assert cfg.train.learning_rate == 2e-4
    assert cfg.train.warmup_steps == 750
    assert cfg.train.micro_batch_size == 2
    assert cfg.train.global_batch_size == 512  # 2 x 16 accumulation x 16 GPUs, published
    assert accumulation_steps(cfg.train, 16) == 16 and accumulation_steps(cfg.train, 8) == 32
    assert cfg.data.pretokenized is True
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
        "broken.yaml": ("train: [1\n", "not valid YAML"),
    }
    for name, (text, hint) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=hint):
            load_config(tmp_path / name)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_a_config_name_finds_the_projects_configs_from_any_directory(tmp_path, monkeypatch):
    """Finding: `--config tiny` did not exist, and `--config configs/tiny.yaml` failed outside the checkout."""
    monkeypatch.chdir(tmp_path)
    tiny = load_config(CONFIGS / "tiny.yaml")
    for name in ("tiny", "tiny.yaml", "configs/tiny.yaml", "configs/tiny"):
        assert load_config(name) == tiny, name
    (tmp_path / "tiny.yaml").write_text("train:\n  run_name: mine\n")  # a file here comes first
    assert load_config("tiny").train.run_name == "mine"
    with pytest.raises(ConfigError) as e:
        load_config("tinny")
    assert "config file tinny does not exist" in str(e.value) and "codeparrot-small, codeparrot-small-modern, tiny, tiny-modern" in str(e.value)


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


# --- a YAML file and an override give the same value ---------------------------------------------------------------

def _from_file(tmp_path: Path, dotted: str, text: str) -> Config:
    """The config of a one-key YAML file `section:\n  key: text`."""
    section, key = dotted.split(".")
    path = tmp_path / "one.yaml"
    path.write_text(f"{section}:\n  {key}: {text}\n")
    return load_config(path)


@pytest.mark.parametrize("dotted, text, expected", [
    ("train.mixed_precision", "no", "no"),  # YAML 1.1 would read a bool here
    ("train.mixed_precision", "bf16", "bf16"),
    ("train.run_name", "yes", "yes"),
    ("train.run_name", "off", "off"),
    ("train.run_name", "1.50", "1.50"),  # a string field keeps the text, not float 1.5
    ("train.run_name", "null", "null"),
    ("train.run_name", "007", "007"),
    ("train.compile", "true", True),
    ("train.compile", "No", False),  # bools accept yes/no/on/off in any case
    ("train.compile", "ON", True),
    ("train.compile", "null", None),
    ("data.shuffle", "off", False),
    ("data.shuffle", "FALSE", False),
    ("model.n_layer", "4", 4),
    ("model.n_layer", "~", None),
    ("train.max_steps", "1e3", 1000),
    ("train.learning_rate", "1e-3", 1e-3),
    ("train.learning_rate", "2", 2.0),
    ("train.trackers", "[wandb, tensorboard]", ["wandb", "tensorboard"]),
    ("train.trackers", "tensorboard,wandb", ["tensorboard", "wandb"]),
    ("corpus.local_roots", "[no, 1.50]", ["no", "1.50"]),
])
def test_yaml_file_and_override_give_the_same_value(tmp_path, dotted, text, expected):
    from_file = _from_file(tmp_path, dotted, text)
    from_override = load_config(None, [f"{dotted}={text}"])
    assert from_file == from_override
    section, key = dotted.split(".")
    got = getattr(getattr(from_file, section), key)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("dotted, text, hint", [
    ("train.compile", "maybe", "true or false"),
    ("data.shuffle", "1", "true or false"),
    ("train.max_steps", "1.5", "integer"),
    ("train.learning_rate", "fast", "number"),
    ("train.mixed_precision", "yes", "is not one of auto, bf16, fp16, no"),
])
def test_yaml_file_and_override_reject_the_same_values(tmp_path, dotted, text, hint):
    with pytest.raises(ConfigError, match=hint):
        _from_file(tmp_path, dotted, text)
    with pytest.raises(ConfigError, match=hint):
        load_config(None, [f"{dotted}={text}"])


def test_parse_override_returns_the_text_as_typed():
    assert parse_override("train.max_steps=7") == ("train", "max_steps", "7")
    assert parse_override("eval.prompt=a = b") == ("eval", "prompt", "a = b")
    assert parse_override("train.run_name=") == ("train", "run_name", "")
    assert load_config(None, ["eval.prompt=x=1 # y"]).eval.prompt == "x=1 # y"


def test_string_values_that_yaml_1_1_would_retype_survive_save_and_load(tmp_path):
    cfg = load_config(None, ["train.run_name=1.50", "train.mixed_precision=no", "eval.prompt=on",
                             "corpus.local_roots=yes,null"])
    path = tmp_path / "saved.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert (again.train.run_name, again.eval.prompt, again.corpus.local_roots) == ("1.50", "on", ["yes", "null"])


# --- choices ----------------------------------------------------------------------------------------------------------

def test_choices_are_declared_for_the_closed_string_fields():
    assert CHOICES == {
        "corpus.source": ("local", "path"),
        "corpus.executor": ("local", "slurm", "ray", "pool"),
        "model.preset": ("tiny", "small", "large"),
        "model.attention_backend": ("auto", "flash", "cudnn", "efficient", "math"),
        "model.arch": ("gpt2", "llama"),
        "train.lr_schedule": ("cosine", "constant", "wsd"),
        "train.decay_shape": ("linear", "sqrt"),
        "train.optimizer": ("adamw", "muon"),
        "train.mixed_precision": ("auto", "bf16", "fp16", "no"),
        "sft.method": ("full", "lora"),
        "sft.lr_schedule": ("constant", "cosine"),
        "corpus.quality_signal": ("copies", "stars", "heuristics", "none"),
        "corpus.export_format": ("jsonl", "parquet"),
        "corpus.layout": ("bigquery", "the-stack", "github-code"),
        "corpus.minhash_scheme": ("oph", "permutations"),
        "generate.quality": ("", "low", "medium", "high"),
        "humaneval.quality": ("", "low", "medium", "high"),
        "humaneval.task": ("completion", "infill-single-line", "infill-multi-line"),
        "humaneval.benchmark": ("humaneval", "mbpp", "humaneval-plus", "mbpp-plus"),
        "humaneval.mbpp_split": ("sanitized", "full"),
        "humaneval.mbpp_prompt": ("zero-shot", "3-shot"),
        "eval.quality_bucket": ("", "low", "medium", "high"),
        "eval.quality_token": ("", "low", "medium", "high"),
        "eval.code_benchmark": ("", "humaneval", "mbpp", "humaneval-plus", "mbpp-plus"),
    }


def test_quality_choices_are_the_buckets_prepare_writes():
    """config.py cannot import corpus/ (upstream imports nothing downstream), so this keeps the two lists equal."""
    from codeparrot.config import QUALITY_CHOICES
    from codeparrot.corpus.quality import QUALITY_BUCKETS, QUALITY_SIGNALS

    assert QUALITY_CHOICES == ("", *QUALITY_BUCKETS)
    assert CHOICES["corpus.quality_signal"] == QUALITY_SIGNALS
    from codeparrot.infilling import TASKS

    assert CHOICES["humaneval.task"] == TASKS
    from codeparrot.corpus.minhash import SCHEMES

    assert CHOICES["corpus.minhash_scheme"] == SCHEMES


@pytest.mark.parametrize("dotted", sorted(CHOICES))
def test_every_choice_loads_and_anything_else_is_rejected_with_the_choices(dotted):
    section, key = dotted.split(".")
    for choice in CHOICES[dotted]:
        assert getattr(getattr(load_config(None, [f"{dotted}={choice}"]), section), key) == choice
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{dotted}=bogus"])
    assert str(e.value) == f"{dotted}: 'bogus' is not one of {choice_list(CHOICES[dotted])}"


def test_the_empty_choice_shows_as_quotes():
    """Finding: `'best' is not one of , low, medium, high` hid the empty choice; it reads "" now."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.quality_bucket=best"])
    assert str(e.value) == """eval.quality_bucket: 'best' is not one of "", low, medium, high"""
    line = next(x for x in describe_config(Config()).splitlines() if x.split()[:1] == ["quality_token"])
    assert line.endswith('(one of: "", low, medium, high)')


def test_choices_are_checked_after_overrides_and_in_config_from_dict(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr_schedule: cosin\n")
    with pytest.raises(ConfigError, match="train.lr_schedule: 'cosin' is not one of cosine, constant, wsd"):
        load_config(path)
    assert load_config(path, ["train.lr_schedule=constant"]).train.lr_schedule == "constant"  # the override fixes it
    data = Config().to_dict()
    data["model"]["attention_backend"] = "fast"
    with pytest.raises(ConfigError, match="model.attention_backend: 'fast' is not one of auto, flash"):
        config_from_dict(data)


def test_resume_accepts_auto_none_or_a_path_but_not_empty():
    for value in ("auto", "none", "/runs/tiny/step-200"):
        assert load_config(None, [f"train.resume={value}"]).train.resume == value
    with pytest.raises(ConfigError, match="train.resume: must not be empty"):
        load_config(None, ["train.resume="])


# --- global batch size -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("global_batch, micro, world, expected", [
    (192, 12, 1, 16),
    (192, 12, 2, 8),
    (192, 12, 16, 1),
    (512, 8, 8, 8),
    (512, 2, 64, 4),
])
def test_accumulation_steps_from_global_batch(global_batch, micro, world, expected):
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, gradient_accumulation_steps=99)
    assert accumulation_steps(train, world) == expected
    assert expected * micro * world == global_batch


def test_accumulation_steps_without_global_batch_is_the_configured_one():
    assert accumulation_steps(TrainConfig(gradient_accumulation_steps=16), 8) == 16
    assert load_config(CONFIGS / "tiny.yaml").train.global_batch_size is None


def test_accumulation_steps_that_do_not_divide_say_what_would():
    with pytest.raises(ConfigError) as e:
        accumulation_steps(TrainConfig(global_batch_size=192, micro_batch_size=12), 5)
    msg = str(e.value)
    for part in ("train.global_batch_size=192", "train.micro_batch_size=12", "5 processes", "= 60", "180 or 240"):
        assert part in msg, msg
    with pytest.raises(ConfigError) as e:  # divides, but into 0 steps
        accumulation_steps(TrainConfig(global_batch_size=192, micro_batch_size=12), 32)
    assert "384" in str(e.value) and "micro_batch_size that divides 6: 1, 2, 3, 6" in str(e.value)


def test_global_batch_no_device_count_can_fit_fails_at_load():
    assert load_config(None, ["train.global_batch_size=192"]).train.global_batch_size == 192
    with pytest.raises(ConfigError, match="train.global_batch_size=100"):
        load_config(None, ["train.global_batch_size=100"])  # micro_batch_size 12 never divides it
    with pytest.raises(ConfigError, match="train.global_batch_size must be at least 1, got 0"):  # its range
        load_config(None, ["train.global_batch_size=0"])


# --- ranges ----------------------------------------------------------------------------------------------------------

# Numeric keys any value of which is meaningful: salts and seeds that are hashed, and eval's "0 or negative: all".
UNBOUNDED = {"corpus.split_seed", "eval.max_batches", "generate.seed", "humaneval.seed"}
RANGED = sorted(f"{s}.{k}" for s, fs in _FIELDS.items() for k, f in fs.items() if f.metadata["range"])


def test_every_numeric_key_declares_its_range():
    numeric = {f"{s}.{k}" for s, hints in _HINTS.items() for k, tp in hints.items()
               if any(t in str(tp) for t in ("int", "float")) and "bool" not in str(tp)}
    assert numeric - UNBOUNDED == set(RANGED) and not UNBOUNDED - numeric
    # every default and every shipped config is inside the ranges
    for f in sorted(CONFIGS.glob("*.yaml")):
        load_config(f)


def _outside(bounds: dict) -> float:
    """A value just outside a range's lower bound (or its upper one when it has none)."""
    op, bound = next(iter(bounds.items()))
    return {"ge": bound - 1, "gt": bound, "le": bound + 1, "lt": bound}[op]


@pytest.mark.parametrize("dotted", RANGED)
def test_a_value_outside_its_range_is_refused_with_the_range(dotted):
    section, key = dotted.split(".")
    f = _FIELDS[section][key]
    value = _outside(f.metadata["range"])
    value = float(value) if "float" in str(_HINTS[section][key]) else int(value)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{dotted}={value}"])
    each = " (each item)" if "list" in str(_HINTS[section][key]) else ""
    assert str(e.value) == f"{dotted}{each} must be {range_text(f.metadata['range'])}, got {value!r}"


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-5", "train.max_steps must be at least 1, got -5"),  # the finding: it was accepted
    ("generate.temperature=-0.5", "generate.temperature must be at least 0, got -0.5"),
    ("generate.top_p=2", "generate.top_p must be greater than 0 and at most 1, got 2.0"),
    ("generate.top_p=0", "generate.top_p must be greater than 0 and at most 1, got 0.0"),
    ("generate.top_k=-5", "generate.top_k must be at least 0, got -5"),
    ("corpus.valid_fraction=nan", "corpus.valid_fraction must be between 0 and 1, got nan"),
    ("model.dropout=1", "model.dropout must be at least 0 and less than 1, got 1.0"),
    ("humaneval.ks=1,0", "humaneval.ks (each item) must be at least 1, got 0"),
    ("data.fim_rate=1.5", "data.fim_rate must be between 0 and 1, got 1.5"),
])
def test_ranges_are_checked_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message
    dotted, value = override.split("=")
    (tmp_path / "c.yaml").write_text(f"{dotted.split('.')[0]}:\n  {dotted.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match="must be"):  # a file, and a saved config, are checked the same
        load_config(tmp_path / "c.yaml")
    data = Config().to_dict()
    data[dotted.split(".")[0]][dotted.split(".")[1]] = value
    with pytest.raises(ConfigError, match="must be"):
        config_from_dict(data)


def test_the_bounds_themselves_load_and_describe_shows_the_range():
    cfg = load_config(None, ["generate.top_p=1", "generate.temperature=0", "train.max_steps=1", "model.n_layer=null"])
    assert (cfg.generate.top_p, cfg.generate.temperature, cfg.train.max_steps, cfg.model.n_layer) == (1, 0, 1, None)
    line = next(x for x in describe_config(cfg).splitlines() if x.split()[:1] == ["top_p"])
    assert "(greater than 0 and at most 1)" in line


# --- describe_config and section_summary ----------------------------------------------------------------------------

def test_every_key_has_a_meaning():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{section}.{f.name} has no meaning"
            assert "\n" not in f.metadata["help"], f"{section}.{f.name}: the meaning must be one line"


def _described_lines(text: str, section: str) -> list[str]:
    """The key lines under `section`'s header in describe_config output."""
    block = text.split(section_summary(section) + "\n", 1)[1]
    return block.split("\n\n", 1)[0].rstrip("\n").split("\n")


def test_describe_config_lists_every_key_with_type_value_and_meaning():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.max_steps=7", "model.n_layer=3"])
    text = describe_config(cfg)
    for section, cls in SECTIONS.items():
        lines = _described_lines(text, section)
        assert [line.split()[0] for line in lines] == [f.name for f in dataclasses.fields(cls)]
        for line in lines:
            assert line.startswith("  ") and len(line.split()) >= 4, line
    train = {line.split()[0]: line for line in _described_lines(text, "train")}
    assert train["max_steps"].split()[1:3] == ["int", "7"]
    assert train["mixed_precision"].split()[1:3] == ["str", '"no"']
    assert "one of: auto, bf16, fp16, no" in train["mixed_precision"]
    assert train["compile"].split()[1:5] == ["bool", "|", "null", "null"]
    assert "list[str]" in train["trackers"] and '["tensorboard"]' in train["trackers"]
    assert "int | null" in _described_lines(text, "model")[1] and " 3 " in _described_lines(text, "model")[1]


def test_describe_config_is_aligned():
    lines = [line for line in describe_config(Config()).splitlines() if line.startswith("  ")]
    type_columns = {line.index(line.split()[1], len(line.split()[0]) + 2) for line in lines}
    assert len(type_columns) == 1


def test_describe_config_named_sections_only():
    text = describe_config(Config(), ["train", "data"])
    assert text.splitlines()[0] == section_summary("train")
    assert section_summary("data") in text
    assert section_summary("model") not in text and "attention_backend" not in text
    with pytest.raises(ConfigError, match="valid sections"):
        describe_config(Config(), ["trian"])


def test_section_summary_is_one_line_with_the_docstring():
    for section, cls in SECTIONS.items():
        summary = section_summary(section)
        assert summary.startswith(f"{section}: ") and "\n" not in summary
        assert cls.__doc__.strip().splitlines()[0] in summary
    with pytest.raises(ConfigError, match="valid sections"):
        section_summary("nosuch")


# --- runtime keys and identity --------------------------------------------------------------------------------------

def test_runtime_keys_are_real_keys_and_exclude_data_num_workers():
    for dotted in RUNTIME_KEYS:
        section, key = dotted.split(".")
        assert key in {f.name for f in dataclasses.fields(SECTIONS[section])}, dotted
    assert "data.num_workers" not in RUNTIME_KEYS  # it changes which consumer reads which data
    for dotted in ("train.max_steps", "train.resume", "train.compile", "model.attention_backend", "corpus.num_proc"):
        assert dotted in RUNTIME_KEYS


def test_identity_of_sections_leaves_runtime_keys_out():
    cfg = Config()
    ident = identity(cfg, ["train", "model", "corpus", "data"])
    assert set(ident) == {"train", "model", "corpus", "data"}
    for section, values in ident.items():
        for key in values:
            assert f"{section}.{key}" not in RUNTIME_KEYS
        expected = {f.name for f in dataclasses.fields(SECTIONS[section])} - {
            k.split(".")[1] for k in RUNTIME_KEYS | IDENTITY_WHEN_SET if k.startswith(section + ".")}
        assert set(values) == expected
    assert ident["train"]["learning_rate"] == cfg.train.learning_rate
    assert ident["data"]["num_workers"] == 0


def test_keys_added_later_join_the_identity_only_when_set():
    # a run saved before train.skip_spikes existed keeps its fingerprint (and resumes); turning it on changes it
    plain, on = Config(), load_config(None, ["train.skip_spikes=true"])
    assert "skip_spikes" not in identity(plain, ["train"])["train"]
    assert identity(on, ["train"])["train"]["skip_spikes"] is True
    assert identity(load_config(None, ["train.spike_sigma=3"]), ["train"])["train"]["spike_sigma"] == 3.0


def test_identity_changes_with_results_not_with_runtime_keys():
    base = identity(Config(), ["train", "model"])
    faster = load_config(None, ["train.compile=true", "train.max_steps=9", "model.attention_backend=math",
                                "train.run_name=other"])
    assert identity(faster, ["train", "model"]) == base
    assert identity(load_config(None, ["train.learning_rate=1e-3"]), ["train", "model"]) != base


def test_identity_of_dotted_keys():
    cfg = load_config(None, ["data.seq_length=64"])
    assert identity(cfg, ["data.seq_length"]) == {"data": {"seq_length": 64}}
    assert identity(cfg, ["train.resume"]) == {}  # a runtime key is left out even when named
    both = identity(cfg, ["tokenizer", "data.seq_length"])
    assert both["data"] == {"seq_length": 64} and both["tokenizer"]["vocab_size"] == 32768
    ident = identity(cfg, ["corpus.filters"])
    ident["corpus"]["filters"].append("x")  # a copy: the config is untouched
    assert "x" not in cfg.corpus.filters


@pytest.mark.parametrize("keys, hint", [
    (["trian"], "valid sections"),
    (["trian.max_steps"], "valid sections"),
    (["train.nope"], "valid keys"),
])
def test_identity_unknown_names_raise(keys, hint):
    with pytest.raises(ConfigError, match=hint):
        identity(Config(), keys)


@pytest.mark.parametrize("name", ["codeparrot-small", "codeparrot", "codeparrot-small-modern"])
def test_gpu_configs_track_pass_at_1_during_training(name):
    """eval.code_benchmark is on in the GPU configs (off by default: the tiny demo and the CPU tests)."""
    assert load_config(CONFIGS / f"{name}.yaml").eval.code_benchmark == "humaneval"
    assert load_config(None).eval.code_benchmark == ""
