"""The one typed config tree: dataclasses per section, loaded from YAML with `section.key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


@dataclass
class PathsConfig:
    """Where the artifacts live; each subpath defaults to `workdir/<name>` and can be pointed elsewhere."""

    workdir: str = "work/tiny"
    raw: str = ""  # "" -> workdir/raw
    clean: str = ""  # "" -> workdir/clean
    tokenizer: str = ""  # "" -> workdir/tokenizer
    tokens: str = ""  # "" -> workdir/tokens
    runs: str = ""  # "" -> workdir/runs

    def resolve(self, name: str) -> Path:
        """The directory of artifact `name` (raw, clean, tokenizer, tokens, runs)."""
        value = getattr(self, name)
        return Path(value) if value else Path(self.workdir) / name


@dataclass
class CorpusConfig:
    """Reading the raw export and cleaning it (`export-local`, `prepare`)."""

    source: str = "local"  # "local": export the running Python installation when raw/ is absent; "path": raw/ must exist
    local_roots: list[str] = field(default_factory=list)  # [] -> the interpreter's stdlib (site-packages included)
    local_max_files: int = 0  # cap on files exported from the local installation; 0 = all
    export_shard_records: int = 2000  # records per export shard
    output_shard_records: int = 5000  # records per cleaned shard
    max_bad_ratio: float = 0.05  # stop when more than this fraction of records is bad
    valid_fraction: float = 0.02  # fraction of repositories held out for validation
    split_seed: int = 1  # salt of the stable repo hash that decides the split
    exact_dedup: bool = True  # drop files whose whitespace-free MD5 was seen before


@dataclass
class TokenizerConfig:
    """Byte-level BPE training (`train-tokenizer`)."""

    vocab_size: int = 32768
    n_examples: int = 200000  # train on the first N files of clean/train
    min_frequency: int = 2
    eos_token: str = "<|endoftext|>"
    report_valid_files: int = 2000  # files of clean/valid used to measure chars/token


@dataclass
class DataConfig:
    """Packing tokens into constant-length blocks."""

    seq_length: int = 1024
    chars_per_token: float = 3.6  # estimate used to size the tokenization buffer
    num_of_sequences: int = 256  # blocks' worth of characters tokenized per buffer
    shuffle_buffer: int = 0  # blocks held for shuffling in infinite mode; 0 = no shuffle
    num_workers: int = 0  # DataLoader workers per process
    pretokenized: bool = False


@dataclass
class ModelConfig:
    """GPT-2 shape; `preset` fills every field left as null."""

    preset: str = "tiny"  # tiny | small | large
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    n_positions: Optional[int] = None  # null -> data.seq_length
    vocab_size: Optional[int] = None  # null -> the tokenizer's vocab size
    dropout: float = 0.0
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    gradient_checkpointing: bool = False


@dataclass
class TrainConfig:
    """The Accelerate training loop."""

    run_name: str = "default"
    seed: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 2000
    max_steps: int = 150000
    lr_schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    micro_batch_size: int = 12  # sequences per device per forward pass
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | no
    log_interval: int = 10
    eval_interval: int = 5000
    save_interval: int = 15000
    keep_last: int = 3  # complete checkpoints kept on disk; 0 keeps all
    resume: str = "auto"  # auto | none | path to a step-N directory
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb
    peak_flops: float = 989e12  # per device, for the MFU estimate (H100 bf16 dense)
    compile: bool = False
    fused_adamw: bool = True  # used when the device is CUDA


@dataclass
class EvalConfig:
    """Validation loss and perplexity."""

    batch_size: int = 8
    max_batches: int = 50  # 0 or negative: the whole valid split
    prompt: str = "def fibonacci(n):\n"  # greedy completion shown after evaluation; "" for none
    max_new_tokens: int = 48


@dataclass
class Config:
    """The whole tree; one section per stage family."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as written beside artifacts."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _set(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    sec = getattr(cfg, section)
    hints = _section_types(type(sec))
    if key not in hints:
        raise ConfigError(f"{where}: unknown key {section}.{key}; valid keys: {', '.join(hints)}")
    setattr(sec, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split `section.key=value`; the value is read as YAML so numbers, bools and lists get their types."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip().lower() not in ("null", "~", "none"):
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{p}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{p}: section {section!r} must be a mapping")
            for key, value in values.items():
                _set(cfg, section, key, value, str(p))
    for text in overrides:
        section, key, value = parse_override(text)
        if section in SECTIONS and _section_types(type(getattr(cfg, section))).get(key) is str:
            value = text.split("=", 1)[1]  # a string field keeps the text as typed: `=no` is "no", not False
        _set(cfg, section, key, value, "override")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a saved artifact's config)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _set(cfg, section, key, value, "saved config")
    return cfg


def section_dict(cfg: Config, *sections: str) -> dict[str, Any]:
    """The named sections as a plain dict, for manifests."""
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in sections}


def canonical_json(obj: Any) -> str:
    """Stable JSON text, used for fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
