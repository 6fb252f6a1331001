"""Run bookkeeping: where a run lives, its progress record, its identity, and atomic, pruned checkpoints.

Shared by `train` (which writes checkpoints) and `evaluate` (which reads them), so neither imports the other.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .artifacts import CheckpointError
from .config import Config, ConfigError, canonical_json, config_from_dict, identity, load_config
from .hub import HUB_PREFIX, fetch_checkpoint_once
from .logs import quiet_tied_head_warning
from .model import save_hf
from .tokenizer import TOKENIZER_FILE, set_model_max_length

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TrainerState:
    """What a checkpoint records about progress, beside the accelerate state."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    config_fingerprint: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # eval results so far
    spikes: dict[str, Any] = field(default_factory=dict)  # divergence.SpikeGuard's rolling statistics and count


def resolve_mixed_precision(setting: str) -> str:
    """'auto' means the precision `accelerate launch` was given (its config file or flag), else bf16 on a GPU
    that supports it, else fp32."""
    if setting != "auto":
        return setting
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # the launcher sets "no" when told nothing
    if launcher != "no":
        return launcher
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def run_dir(cfg: Config) -> Path:
    """The directory of the run `train.run_name`: checkpoints, logs, eval results."""
    return cfg.paths.resolve("runs") / cfg.train.run_name


def latest_checkpoint(directory: Path) -> Path | None:
    """The highest complete `step-N` under a run (a `.tmp` save is never complete)."""
    if not directory.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return max(steps)[1] if steps else None


# What generate, evaluate, humaneval and sft load from a checkpoint (a transformers GPT-2 directory has them too).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def newest_model(run: Path, but: Path | None = None) -> Path | None:
    """A run's newest loadable model other than `but`: a fine-tuning run's final/, else its highest complete step-N
    that still holds MODEL_FILES."""
    def loadable(p: Path) -> bool:
        return p != but and all((p / name).is_file() for name in MODEL_FILES)

    if loadable(run / "final"):
        return run / "final"
    steps = [(int(m.group(1)), p) for p in (run.iterdir() if run.is_dir() else ())
             if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file() and loadable(p)]
    return max(steps)[1] if steps else None


def _latest_hint(run: Path, but: Path | None = None) -> str:
    """"; <which complete checkpoint `run` holds besides `but`>" for an error about `but`; "" when `run` is no run."""
    latest = newest_model(run, but)
    if latest is not None:
        return f"; the latest complete one in {run} is {latest}"
    is_run = run.is_dir() and any(STEP_DIR.match(p.name.removesuffix(".tmp")) for p in run.iterdir())
    return f"; {run} holds no {'other ' if but is not None else ''}complete checkpoint" if is_run else ""


def _runs_under(directory: Path) -> list[Path]:
    """The newest model of each run right under `directory` (a paths.runs directory given as a checkpoint)."""
    models = (newest_model(p) for p in sorted(directory.iterdir()) if p.is_dir())
    return [m for m in models if m is not None]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is no loadable checkpoint directory (it does not exist, is a run, is partial), or None."""
    if not ckpt.exists():
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        if tmp.is_dir():  # the save of step-N was interrupted: only its .tmp is there
            return f"does not exist: only {tmp.name}, an interrupted save, is there{_latest_hint(ckpt.parent)}"
        return f"does not exist{_latest_hint(ckpt.parent)}"
    if not ckpt.is_dir():
        return "is a file, not a checkpoint directory"
    missing = [name for name in MODEL_FILES if not (ckpt / name).is_file()]
    if missing and any(STEP_DIR.match(p.name.removesuffix(".tmp")) or p.name == "final" for p in ckpt.iterdir()):
        latest = newest_model(ckpt)
        if latest is None:
            return "is a run directory, not a checkpoint, and holds no complete checkpoint yet"
        return f"is a run directory, not a checkpoint; did you mean {latest} (its latest)?"
    if ckpt.name.endswith(".tmp"):  # renamed to step-N only once complete (trainer_state.json last): never loaded
        missing = [name for name in (*MODEL_FILES, TRAINER_STATE) if not (ckpt / name).is_file()]
        lacks = f"missing {', '.join(missing)}" if missing else "never renamed to its final name"
        return f"is a partial save, interrupted ({lacks}){_latest_hint(ckpt.parent, ckpt)}"
    if len(missing) == len(MODEL_FILES) and (runs := _runs_under(ckpt)):
        shown = ", ".join(str(m) for m in runs[:3]) + (", ..." if len(runs) > 3 else "")
        return f"is a directory of runs, not a checkpoint; their latest checkpoints: {shown}"
    if missing:
        return f"is not a complete checkpoint: missing {', '.join(missing)}{_latest_hint(ckpt.parent, ckpt)}"
    return None


def check_checkpoint(checkpoint: str | Path, given_as: str = "") -> Path:
    """`checkpoint` as a Path when it is a loadable checkpoint; else FileNotFoundError naming what is wrong and the
    checkpoint to use instead. `given_as` is how the user gave it ("--checkpoint ", "sft.base="): the message
    starts with it."""
    ckpt = Path(checkpoint)
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise FileNotFoundError(f"{given_as}{ckpt} {problem}")
    return ckpt


def read_trainer_state(checkpoint: Path) -> TrainerState:
    """The progress record of a complete checkpoint."""
    return TrainerState(**json.loads((checkpoint / TRAINER_STATE).read_text()))


def training_fingerprint(cfg: Config, inputs: dict[str, str]) -> str:
    """What must match for a resume or a skip: every key that shapes the run's numbers, and the inputs.

    Runtime keys (config.RUNTIME_KEYS: the run's name and length, I/O cadence, speed and memory switches) are
    left out, so a user can resume under another name, extend a run, or turn on chunked loss after an OOM.
    """
    return canonical_json({**identity(cfg, ("model", "data", "train")), "inputs": inputs})


_DEFAULT = object()  # a key an identity leaves out (config.IDENTITY_WHEN_SET at its default)
MAX_CHANGES = 5  # keys named in a refused resume's message


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layer": 2}} -> {"model.n_layer": 2}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(value: Any) -> str:
    """A value as the user types it in an override; a key left out of an identity holds its default."""
    if value is _DEFAULT:
        return "(default)"
    return value if isinstance(value, str) else json.dumps(value)


def _identities(saved: str, current: str, ckpt: Path, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved and current identities as flat {key: value}: from the fingerprints (canonical JSON of the
    identity and the inputs), else (a fingerprint of another form) from the checkpoint's config.yaml."""
    try:
        old, new = json.loads(saved), json.loads(current)
        if isinstance(old, dict) and isinstance(new, dict):
            return _flatten(old), _flatten(new)
    except ValueError:
        pass
    sections = ("model", "data", "train")
    try:
        old_cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    except (OSError, ConfigError, yaml.YAMLError, AttributeError):
        return {}, {}
    return _flatten(identity(old_cfg, sections)), _flatten(identity(cfg, sections))


def identity_changes(saved: str, current: str, ckpt: Path, cfg: Config) -> str:
    """What differs between a checkpoint's identity and this run's, as `model.n_layer: 2 -> 1, ...` (at most
    MAX_CHANGES keys); "" when it cannot be told."""
    old, new = _identities(saved, current, ckpt, cfg)
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k, _DEFAULT) != new.get(k, _DEFAULT)]
    shown = [f"{k}: {_shown(old.get(k, _DEFAULT))} -> {_shown(new.get(k, _DEFAULT))}" for k in keys[:MAX_CHANGES]]
    more = f" and {len(keys) - MAX_CHANGES} more" if len(keys) > MAX_CHANGES else ""
    return ", ".join(shown) + more


def fetch_on_main_first(spec: str, cfg: Config, into: Path, training_state: bool = False) -> Path:
    """Download a `hub:` checkpoint once per node (the weights; with `training_state`, all an exact resume needs)."""
    return fetch_checkpoint_once(spec, cfg.hub, into, training_state)


def find_resume(cfg: Config, out: Path, fingerprint: str, run_key: str = "train.run_name"
                ) -> tuple[Path | None, TrainerState | None]:
    """The checkpoint `train.resume` names (auto: the run's latest), checked to belong to this run.

    (checkpoint, None) means: start a new run from that checkpoint's weights (a `hub:` one without training state).
    """
    resume = cfg.train.resume
    if resume == "none":
        return None, None
    if resume.startswith(HUB_PREFIX):
        ckpt = fetch_on_main_first(resume, cfg, out / "hub", training_state=True)
        if not (ckpt / "accelerate").is_dir():  # pushed without hub.include_training_state
            log.warning("train: %s holds the weights only, not the optimizer and data state: starting a new run "
                        "from its weights (push with hub.include_training_state=true to resume exactly)", resume)
            return ckpt, None
    else:
        ckpt = latest_checkpoint(out) if resume == "auto" else Path(resume)
    if ckpt is None:
        return None, None
    if not (ckpt / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"train.resume={resume} is neither auto, none, nor a complete checkpoint directory "
                                f"(no {ckpt / TRAINER_STATE})")
    prior = read_trainer_state(ckpt)
    if prior.config_fingerprint != fingerprint:
        changed = identity_changes(prior.config_fingerprint, fingerprint, ckpt, cfg)
        raise ValueError(f"cannot resume from {ckpt}: it was trained with another config or other inputs"
                         f"{f' ({changed})' if changed else ''}; use another {run_key} or train.resume=none")
    return ckpt, prior


def require_latest_checkpoint(cfg: Config) -> Path:
    """The run's latest complete checkpoint; a clear error when the run has none."""
    ckpt = latest_checkpoint(run_dir(cfg))
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir(cfg)}; run `codeparrot train` first")
    return ckpt


def checkpoint_config(checkpoint: str | Path, path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A checkpoint's own config (`step-N/config.yaml`), with a config file and overrides applied on top."""
    if not Path(checkpoint).is_dir():  # not "has no config.yaml": the path itself is wrong
        raise FileNotFoundError(f"{checkpoint} {checkpoint_problem(Path(checkpoint))}")
    saved = Path(checkpoint) / "config.yaml"
    if not saved.is_file():  # e.g. a checkpoint made by transformers: only the file and overrides apply
        log.info("%s has no config.yaml; using %s", checkpoint, path or "the defaults")
        return load_config(path, overrides)
    try:
        base = config_from_dict(yaml.safe_load(saved.read_text()))
    except (ConfigError, yaml.YAMLError, AttributeError) as e:
        raise CheckpointError(f"{saved} is not a readable config ({e})") from e
    return load_config(path, overrides, base=base)


def write_model_dir(directory: Path, gpt, weights: dict[str, torch.Tensor], tokenizer_dir: Path, eos_token_id: int,
                    cfg: Config) -> None:
    """What `transformers` and `generate` load: config.json + model.safetensors, the tokenizer files, config.yaml."""
    save_hf(gpt, directory, eos_token_id=eos_token_id, state_dict=weights)
    for name in TOKENIZER_FILES:
        if name == TOKENIZER_FILE or (tokenizer_dir / name).is_file():  # a transformers base may lack the others
            shutil.copy2(tokenizer_dir / name, directory / name)
    if (directory / "tokenizer_config.json").is_file():
        set_model_max_length(directory, gpt.config.n_positions)
    cfg.save(directory / "config.yaml")


class Checkpointer:
    """Writes `step-N/` atomically (a `.tmp` name until complete), and prunes old ones."""

    def __init__(self, accelerator, directory: Path, keep_last: int, pusher=None, export=None):
        self.accelerator, self.directory, self.keep_last = accelerator, directory, keep_last
        self.pusher = pusher  # hub.CheckpointPusher on the main process when the run pushes to the Hub
        self.export = export  # weights -> plain GPT-2 weights (LoRA merges its adapters); None: as they are

    def save(self, step: int, model: torch.nn.Module, train_loader, state: TrainerState, cfg: Config,
             tokenizer_dir: Path, eos_token_id: int, last: bool = False) -> Path:
        """Save everything a resume and `transformers` need; the directory appears only once complete."""
        acc = self.accelerator
        final, tmp = self.directory / f"step-{step}", self.directory / f"step-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            self._write(tmp, model, train_loader, state, cfg, tokenizer_dir, eos_token_id)
        except BaseException as e:
            # A failed save (a full disk, say) never becomes the latest: only complete dirs are renamed.
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception):  # safetensors and torch report a full disk in their own exception types
                raise CheckpointError(f"saving {final} failed ({type(e).__name__}: {e}); nothing of it was kept, "
                                      f"the latest checkpoint is {latest_checkpoint(self.directory)}") from e
            raise
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.pusher is not None:  # pushed from its final name, after the atomic rename
                self.pusher.offer(final, step, last)
            self._prune(step)
        acc.wait_for_everyone()
        log.info("checkpoint: saved %s", final)
        return final

    def _write(self, tmp: Path, model, train_loader, state: TrainerState, cfg: Config, tokenizer_dir: Path,
               eos_token_id: int) -> None:
        acc = self.accelerator
        with quiet_tied_head_warning():  # the tied LM head is dropped from the file and tied again on load
            acc.save_state(str(tmp / "accelerate"))  # model, optimizer, RNG of every process
        weights = acc.get_state_dict(model)  # gathers FSDP shards; a collective, so every rank calls it
        # Each rank's data position differs, so each writes its own file.
        torch.save(train_loader.state_dict(), tmp / f"data_state_rank{acc.process_index}.pt")
        if acc.is_main_process:
            weights = self.export(weights) if self.export is not None else weights
            write_model_dir(tmp, acc.unwrap_model(model), weights, tokenizer_dir, eos_token_id, cfg)
            # trainer_state.json last: its presence marks the checkpoint complete.
            (tmp / TRAINER_STATE).write_text(json.dumps(vars(state), indent=2) + "\n")

    def finish_pushes(self, step: int) -> dict[str, Any]:
        """Wait for the Hub pushes (main process), then prune what they kept; the pushes' summary."""
        if self.pusher is None:
            return {}
        result = self.pusher.finish()
        self._prune(step)
        return result

    def _prune(self, current: int) -> None:
        """Keep the newest `keep_last` checkpoints up to `current`; never touch later ones of an earlier run."""
        if self.keep_last <= 0:
            return
        steps = sorted((int(m.group(1)), p) for p in self.directory.iterdir()
                       if (m := STEP_DIR.match(p.name)) and int(m.group(1)) <= current)
        protected = self.pusher.protected() if self.pusher is not None else set()
        for _, path in steps[:-self.keep_last]:
            if path in protected:  # waiting or being pushed: pruned at a later save
                log.info("checkpoint: keeping %s until its push is done", path)
                continue
            shutil.rmtree(path, ignore_errors=True)

    def restore(self, checkpoint: Path, train_loader) -> TrainerState:
        """Load the accelerate state and this rank's data position of `checkpoint`; return its progress."""
        acc = self.accelerator
        data_state = checkpoint / f"data_state_rank{acc.process_index}.pt"
        if not data_state.is_file():
            raise FileNotFoundError(f"{data_state} missing: resume with the world size the checkpoint was saved with")
        try:
            acc.load_state(str(checkpoint / "accelerate"))
            train_loader.load_state_dict(torch.load(data_state, weights_only=False))
        except Exception as e:  # torch, safetensors and pickle each raise their own kind on a damaged file
            raise CheckpointError(f"checkpoint {checkpoint} is damaged ({type(e).__name__}: {e}); delete it to "
                                  f"resume from the one before, or set train.resume=none") from e
        log.info("train: resumed from %s", checkpoint)
        return read_trainer_state(checkpoint)
