"""The `generate` command: prompts (left to right, infill, instruction) as token ids, the checkpoint to sample
from, and the streamed or written samples; the sampling itself is sampler.py's."""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO, Union

import torch
import yaml

from .artifacts import CheckpointError
from .config import PROJECT_CONFIGS, Config, ConfigError, load_config
from .model import load_hf
from .corpus.quality import QUALITY_BUCKETS
from .data.transforms import SpecialIds
from .runs import check_checkpoint, latest_checkpoint
from .sampler import Completion, SamplingConfig, check_prompt, sample
from .sft.format import format_prompt
from .tokenizer import text_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Infill:
    """A fill-in-the-middle prompt: the model writes the middle between prefix and suffix."""

    prefix: str
    suffix: str


@dataclass(frozen=True)
class Instruction:
    """An instruction (and its optional input) for a fine-tuned model: the model writes the response."""

    instruction: str
    input: str = ""


Prompt = Union[str, Infill, Instruction]  # a left-to-right prompt, an infill, or an instruction


def text_ids(tokenizer, text: str) -> list[int]:
    """The text's tokens, special strings as text: a literal "<|endoftext|>" or "<fim_middle>" stays text."""
    return text_encoder(tokenizer).encode(text, add_special_tokens=False).ids


def condition_ids(tokenizer, eos_id: Optional[int], quality: str = "") -> list[int]:
    """What starts every prompt: EOS (training puts it before every document), then the quality token if asked."""
    head = [eos_id] if eos_id is not None else []
    if not quality:
        return head
    if quality not in QUALITY_BUCKETS:
        raise ValueError(f"unknown quality bucket {quality!r}; one of: {', '.join(QUALITY_BUCKETS)}")
    return head + [SpecialIds.from_tokenizer(tokenizer).quality[QUALITY_BUCKETS.index(quality)]]


def encode_prompt(tokenizer, text: str, eos_id: Optional[int], quality: str = "") -> list[int]:
    """A left-to-right prompt: [EOS, <quality_q> if asked] + the text's tokens."""
    return condition_ids(tokenizer, eos_id, quality) + text_ids(tokenizer, text)


def infill_prompt(tokenizer, prefix: str, suffix: str, eos_id: Optional[int], quality: str = "") -> list[int]:
    """The PSM prompt, as training writes a FIM document up to its middle: [EOS, <quality_q> if asked,
    <fim_prefix>] + prefix + [<fim_suffix>] + suffix + [<fim_middle>]; the model then writes the middle and EOS."""
    ids = SpecialIds.from_tokenizer(tokenizer)  # a tokenizer trained before they were reserved is refused
    return (condition_ids(tokenizer, eos_id, quality) + [ids.prefix] + text_ids(tokenizer, prefix) + [ids.suffix]
            + text_ids(tokenizer, suffix) + [ids.middle])


# The instruction formats by name. `sft` formats every record with sft/format.py's format_prompt and its config
# section names no format, so every checkpoint reads as "alpaca"; a later `sft.prompt_format` key is read here.
INSTRUCTION_FORMATS: dict[str, Callable[[dict[str, str]], str]] = {"alpaca": format_prompt}


def instruction_format(sft: Any = None) -> Callable[[dict[str, str]], str]:
    """The prompt format a checkpoint's sft section names, else the one `sft` trains with (the chapter's Alpaca)."""
    name = getattr(sft, "prompt_format", "alpaca")
    if name not in INSTRUCTION_FORMATS:
        raise ValueError(f"the checkpoint's sft.prompt_format {name!r} is not one of {', '.join(INSTRUCTION_FORMATS)}")
    return INSTRUCTION_FORMATS[name]


def instruction_ids(tokenizer, prompt: Instruction, sft: Any = None) -> list[int]:
    """The prompt ids of a fine-tuning row (sft/format.py's encode_record): the formatted text's tokens, special
    strings as text, with no EOS or quality token before them (fine-tuning rows have none)."""
    return text_ids(tokenizer, instruction_format(sft)({"instruction": prompt.instruction, "input": prompt.input}))


def prompt_ids(tokenizer, prompt: Prompt, eos_id: Optional[int], quality: str = "", sft: Any = None) -> list[int]:
    """The token ids of a left-to-right prompt, an infill, or an instruction (in the format of `sft`, a
    checkpoint's sft section)."""
    if isinstance(prompt, Instruction):
        if quality:
            raise ValueError(f"an instruction takes no quality token (fine-tuning rows have none), got {quality!r}")
        return instruction_ids(tokenizer, prompt, sft)
    if isinstance(prompt, Infill):
        return infill_prompt(tokenizer, prompt.prefix, prompt.suffix, eos_id, quality)
    return encode_prompt(tokenizer, prompt, eos_id, quality)


def load_checkpoint(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """The model (on `device`) and tokenizer of a `step-N` checkpoint; a damaged one raises CheckpointError."""
    from tokenizers import Tokenizer

    ckpt = check_checkpoint(checkpoint)  # missing, a run directory or a partial save: says which one to use
    try:
        return load_hf(ckpt).to(device), text_encoder(Tokenizer.from_file(str(ckpt / "tokenizer.json")))
    except Exception as e:  # tokenizers and safetensors raise their own kinds on a damaged file
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {e})") from e


def fine_tuned_model(run: Path) -> Optional[Path]:
    """A fine-tuning run's model: its final/ once written (atomically), else its latest step-N."""
    final = run / "final"
    return final if (final / "config.json").is_file() else latest_checkpoint(run)


def saved_as_fine_tuned(checkpoint: Path) -> bool:
    """Whether a checkpoint's saved config.yaml is a fine-tuning run's: `sft` saves it with train.run_name =
    sft.run_name (read as plain YAML, so that a config of another version still answers)."""
    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
        return saved["train"]["run_name"] == saved["sft"]["run_name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False


def runs_of_kind(runs: Path, fine_tuned: bool) -> dict[str, Path]:
    """{run name: its model} of the pretraining runs (fine-tuning runs, when `fine_tuned`) under `runs`."""
    found = {}
    for run in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else ():
        model = fine_tuned_model(run) if fine_tuned else latest_checkpoint(run)
        if model is not None and saved_as_fine_tuned(model) == fine_tuned:
            found[run.name] = model
    return found


def how_to_name_run(runs: Path, name: str, key: str) -> str:
    """What selects run `name` on the command line: `--config C` for a project config writing it, else `key=name`."""
    for path in sorted(PROJECT_CONFIGS.glob("*.yaml")):
        try:
            cfg = load_config(path)
        except ConfigError:
            continue
        section, _, field = key.partition(".")
        if cfg.paths.resolve("runs").resolve() == runs.resolve() and getattr(getattr(cfg, section), field) == name:
            return f"--config {path.stem}"
    return f"{key}={name}"


def default_checkpoint(cfg: Config, run_named: bool, fine_tuned: bool = False) -> Path:
    """The model sampled when no --checkpoint is given: the latest of the config's run (sft.run_name's final/ when
    `fine_tuned`); when the command line named no run (`run_named` false: no --config, no run key), the only run of
    that kind under paths.runs; else an error that says what to pass."""
    runs, key = cfg.paths.resolve("runs"), "sft.run_name" if fine_tuned else "train.run_name"
    run = runs / (cfg.sft.run_name if fine_tuned else cfg.train.run_name)
    model = fine_tuned_model(run) if fine_tuned else latest_checkpoint(run)
    if model is not None:
        return model
    others, kind = runs_of_kind(runs, fine_tuned), "fine-tuning" if fine_tuned else "pretraining"
    if not run_named and len(others) == 1:
        # the defaults' run name is rarely the one trained (the demo's is tiny): the one run there is the one meant
        (name, model), = others.items()
        log.info("no --config and no checkpoint under %s: using %s, the only %s run under %s (%s names it)",
                 run, model, kind, runs, how_to_name_run(runs, name, key))
        return model
    if not others:
        stage = "sft" if fine_tuned else "train"
        raise FileNotFoundError(f"no complete checkpoint under {run}; run `codeparrot {stage}` first")
    hints = "; ".join(f"{name}: {how_to_name_run(runs, name, key)}" for name in others)
    raise FileNotFoundError(f"no complete checkpoint under {run}; {runs} holds the {kind} runs {', '.join(others)}: "
                            f"pick one ({hints}) or pass --checkpoint")


class TextStreamer:
    """Writes one sample's text as it grows, holding back a tail that could still become a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], out: TextIO) -> None:
        self.decode, self.out = decode, out
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may be the start of a stop string
        self.shown = 0

    def update(self, tokens: list[int]) -> None:
        """Show the new text, except the held-back tail and a partly decoded (multi-byte) character."""
        text = self.decode(tokens)
        safe = len(text.rstrip("\ufffd")) - self.hold
        if safe > self.shown:
            self.out.write(text[self.shown:safe])
            self.out.flush()
            self.shown = safe

    def finish(self, completion: Completion, tail: str = "") -> None:
        """Show the rest of the final (stop-cut) text, then `tail` (an infill's suffix) and a newline."""
        self.out.write(completion.text[self.shown:] + tail + "\n")
        self.out.flush()


def read_prompts(prompts: Sequence[str], prompt_file: Optional[str], stdin: TextIO, prefix: Optional[str] = None,
                 suffix: Optional[str] = None, instruction: Optional[str] = None,
                 input_text: Optional[str] = None) -> list[Prompt]:
    """Prompts from --prompt (each one), a file (a .jsonl: one {"prompt": ...} per line; else the whole file), or
    stdin (the whole text) when neither is given; or the one infill of --prefix/--suffix (either may be omitted); or
    the one --instruction (with its --input)."""
    if instruction is None and input_text is not None:
        raise ValueError("--input is the input of an --instruction; give --instruction too")
    if instruction is not None:
        if prompts or prompt_file or prefix is not None or suffix is not None:
            raise ValueError("--instruction (a fine-tuned model's prompt format) and --prompt/--prompt-file/"
                             "--prefix/--suffix are mutually exclusive; give one or the other")
        return [Instruction(instruction, input_text or "")]
    if prefix is not None or suffix is not None:
        if prompts or prompt_file:
            raise ValueError("--prefix/--suffix (infill) and --prompt/--prompt-file (left to right) are mutually "
                             "exclusive; give one or the other")
        return [Infill(prefix or "", suffix or "")]
    found: list[Prompt] = list(prompts)
    if prompt_file:
        path = Path(prompt_file)
        if path.suffix == ".jsonl":
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            for n, line in enumerate(lines, 1):
                try:
                    found.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object with a \"prompt\" ({e})") from None
        else:
            found.append(path.read_text())
    if not found:
        if stdin.isatty():
            raise ValueError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe the prompt to stdin")
        found.append(stdin.read())
    return found


def prompt_fields(prompt: Prompt) -> dict[str, str]:
    """A prompt's fields in a JSON Lines row: `prompt`, an infill's `prefix` and `suffix`, or an instruction's
    `instruction` and `input`."""
    if isinstance(prompt, Instruction):
        return {"instruction": prompt.instruction, "input": prompt.input}
    return {"prefix": prompt.prefix, "suffix": prompt.suffix} if isinstance(prompt, Infill) else {"prompt": prompt}


def stream_head(prompt: Prompt, j: int, i: int, n: int) -> str:
    """What the stream shows before sample i of prompt j: a header, then the text the sample continues (an
    infill's prefix). An instruction shows only its response: no prompt, and a header only between n > 1 samples."""
    if isinstance(prompt, Instruction):
        return f"=== sample {i} ===\n" if n > 1 else ""
    return f"=== prompt {j}, sample {i} ===\n{prompt.prefix if isinstance(prompt, Infill) else prompt}"


def check_instructions(cfg: Config, checkpoint: str | Path, prompts: Sequence[Prompt], names: dict[str, str]) -> None:
    """Refuse quality conditioning of an instruction; warn when the checkpoint was not instruction-tuned."""
    if not any(isinstance(p, Instruction) for p in prompts):
        return
    if cfg.generate.quality:
        raise ValueError(f"{names.get('quality', 'generate.quality')} {cfg.generate.quality!r}: an instruction takes "
                         "no quality token (fine-tuning rows have none); leave it unset")
    if not saved_as_fine_tuned(Path(checkpoint)):
        log.warning("%s is not from an `sft` run (its config.yaml's train.run_name is not sft.run_name): "
                    "the response is a pretrained model's continuation of the instruction format", checkpoint)


def run_generate(cfg: Config, checkpoint: str | Path, prompts: Sequence[Prompt], output: Optional[str] = None,
                 stream: Optional[TextIO] = None, names: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Sample cfg.generate.n completions (an Infill's: its middle; an Instruction's: its response) of each prompt,
    conditioned on cfg.generate.quality when set; stream them to `stream` and/or write JSON Lines. `names`: the
    flag that set a generate key ({"max_new_tokens": "--max-new-tokens"}), which errors name instead of the key."""
    names = names or {}
    check_instructions(cfg, checkpoint, prompts, names)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint(checkpoint, device)
    g = cfg.generate
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
    sampling = SamplingConfig(g.n, g.max_new_tokens, g.temperature, g.top_k, g.top_p, eos_id, tuple(g.stop), g.seed)
    ids = [prompt_ids(tokenizer, p, eos_id, g.quality, cfg.sft) for p in prompts]
    for prompt in ids:  # every prompt is checked before any is sampled
        check_prompt(len(prompt), g.max_new_tokens, model.config.n_positions,
                     names.get("max_new_tokens", "generate.max_new_tokens"))
    streamers: dict[tuple[int, int], TextStreamer] = {}

    def streamer(j: int, i: int) -> TextStreamer:
        if (j, i) not in streamers:  # a header, then the prompt (an infill's prefix), which the completion continues
            stream.write(stream_head(prompts[j], j, i, g.n))
            streamers[j, i] = TextStreamer(decode, g.stop, stream)
        return streamers[j, i]

    live = stream is not None and g.n == 1  # one sample at a time can be followed live; n interleaved cannot
    start = time.perf_counter()
    results = []
    for j, prompt in enumerate(ids):  # one prompt at a time: its samples do not depend on the other prompts
        on_token = (lambda _, i, tokens: streamer(j, i).update(tokens)) if live else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            results.append(sample(model, [prompt], sampling, decode, on_token)[0])
        tail = prompts[j].suffix if isinstance(prompts[j], Infill) else ""  # the filled file reads on after the middle
        for i, c in enumerate(results[-1] if stream is not None else ()):
            streamer(j, i).finish(c, tail)
    seconds = time.perf_counter() - start
    rows = [{**prompt_fields(prompts[j]), "sample": i, "completion": c.text, "finish": c.finish,
             "tokens": len(c.tokens)} for j, completions in enumerate(results) for i, c in enumerate(completions)]
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_tokens = sum(r["tokens"] for r in rows)
    return {"samples": len(rows), "tokens": n_tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1), **({"written": output} if output else {})}
