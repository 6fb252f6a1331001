"""Batched sampling with a static KV cache: prefill each prompt once, then decode its n samples together."""
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
from .model import GPT, KVCache, load_hf, model_device
from .corpus.quality import QUALITY_BUCKETS
from .data.transforms import SpecialIds
from .runs import check_checkpoint, latest_checkpoint
from .sft.format import format_prompt
from .tokenizer import text_encoder

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How to sample: n per prompt, temperature 0 = greedy, top_k 0 / top_p 1.0 = no filtering."""

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: Optional[int] = None
    stop: Sequence[str] = ()
    seed: int = 0


@dataclass
class Completion:
    """One sample: its generated tokens, its text cut before the first stop string, and why it ended."""

    tokens: list[int]  # generated tokens; EOS left out; ends with the token that completed a stop string, if any
    text: str  # decode(tokens), cut just before the first stop string ("" when no decode was given)
    finish: str  # "eos", "stop" or "length"


def check_prompt(n_prompt: int, max_new_tokens: int, n_positions: int, name: str = "max_new_tokens") -> None:
    """Refuse a prompt whose completion would not fit the context: cropping would silently change the prompt.
    `name` is what set max_new_tokens (a flag or a config key): the message tells the user what to change."""
    if n_prompt == 0:
        raise ValueError("empty prompt: give at least one token (e.g. EOS)")
    if max_new_tokens >= n_positions:
        raise ValueError(f"{name} {max_new_tokens} leaves no room for a prompt in the model's context "
                         f"n_positions {n_positions}; lower {name} below {n_positions}")
    if n_prompt + max_new_tokens > n_positions:
        raise ValueError(f"prompt of {n_prompt} tokens + {name} {max_new_tokens} = "
                         f"{n_prompt + max_new_tokens} exceeds the model's context n_positions {n_positions}; "
                         f"shorten the prompt to at most {n_positions - max_new_tokens} tokens or lower {name}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits [B, V] outside the top-k and outside the nucleus of mass top_p to -inf."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p; the top token always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


NUCLEUS_CANDIDATES = 256  # top-p first looks for its nucleus among this many most likely tokens


def nucleus_candidates(logits: torch.Tensor, top_k: int, top_p: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The kept tokens of filter_logits, found among the top candidates instead of sorting the whole vocabulary.

    Returns (logits [B, K] of the candidates with the dropped ones at -inf, their token ids [B, K]), or None when
    the candidates cannot be shown to hold all that filter_logits keeps (the caller then sorts everything).
    """
    V = logits.size(-1)
    top_k = top_k if 0 < top_k < V else 0  # top-k of the whole vocabulary keeps everything, as in filter_logits
    if top_k > NUCLEUS_CANDIDATES or (not top_k and top_p >= 1.0):
        # the nucleus is normalised over all top_k tokens, more than the candidates hold; or nothing is filtered
        return None
    # one extra candidate shows whether a tie at the k-th logit makes filter_logits keep more than top_k tokens
    values, ids = logits.topk(min(V, top_k + 1 if top_k else NUCLEUS_CANDIDATES), dim=-1)  # [B, K], most likely first
    if top_k:
        if top_k < values.size(-1) and bool((values[:, top_k] == values[:, top_k - 1]).any()):
            return None
        values, ids = values[:, :top_k], ids[:, :top_k]
    if top_p >= 1.0:
        return values, ids  # top-k only (filter_logits skips the nucleus, so must we: rounding could drop a token)
    # probabilities over what top-k keeps (the whole vocabulary when top_k is off), as filter_logits computes them
    total = values.logsumexp(-1, keepdim=True) if top_k else logits.logsumexp(-1, keepdim=True)
    probs = (values - total).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # [B, K]: mass of the tokens ranked above each
    # with top-k off, a token past the candidates is kept when the candidates hold less than top_p
    if not top_k and values.size(-1) < V and bool((mass_before[:, -1] + probs[:, -1] < top_p).any()):
        return None
    return values.masked_fill(mass_before >= top_p, float("-inf")), ids


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Pick one token per row of logits [B, V]: argmax at temperature 0, else a filtered softmax sample."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    # A full-vocabulary sort and draw costs as much as a quarter of a small model's decode step on a CPU; the
    # nucleus at code-sampling temperatures holds a handful of tokens, so look among the top ones first.
    found = nucleus_candidates(logits, cfg.top_k, cfg.top_p) if cfg.top_p < 1.0 or cfg.top_k > 0 else None
    if found is not None:
        kept, ids = found
        return ids.gather(1, draw(kept.softmax(dim=-1), gen)[:, None]).squeeze(1)
    return draw(filter_logits(logits, cfg.top_k, cfg.top_p).softmax(dim=-1), gen)


def draw(probs: torch.Tensor, gen: Optional[torch.Generator]) -> torch.Tensor:
    """One index per row of probs [B, V] by inverse CDF: one uniform per row (multinomial draws V exponentials)."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    u = torch.rand(probs.size(0), 1, device=probs.device, generator=gen) * cdf[:, -1:]  # in [0, row total)
    # the first index whose cdf exceeds u: a zero-probability token has cdf equal to its left neighbour's, never picked
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


OnToken = Callable[[int, list[int]], None]  # (sample index, its generated tokens so far): called after each token

# Finished rows stay in the batch, masked, until this fraction of the cache's rows is finished: compacting copies
# every layer's whole max_len cache (~21 GB at batch 100 on a large model), while a masked row costs only its
# share of one decode step.
COMPACT_FINISHED = 0.5


@torch.no_grad()
def sample_prompt(model: GPT, prompt: list[int], cfg: SamplingConfig, gen: Optional[torch.Generator],
                  decode: Optional[Callable[[list[int]], str]], on_token: Optional[OnToken] = None
                  ) -> list[Completion]:
    """cfg.n completions of one prompt: prefill [1, T] once, repeat the cache to n rows, decode them together."""
    T = len(prompt)
    device = model_device(model)
    cache = KVCache(model.config.n_layer, T + cfg.max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache).logits[:, -1]  # [1, V]
    cache.repeat_rows(cfg.n)
    logits = logits.expand(cfg.n, -1)  # [n, V]
    tokens: list[list[int]] = [[] for _ in range(cfg.n)]
    done: list[Optional[Completion]] = [None] * cfg.n
    rows = list(range(cfg.n))  # sample index of each cache row
    live = list(range(cfg.n))  # the cache rows whose samples are not finished
    for step in range(cfg.max_new_tokens):
        # only live rows draw, so that the random stream (one uniform per row) is that of a fully compacted batch
        live_logits = logits if len(live) == len(rows) else logits[torch.tensor(live, device=device)]
        picked = dict(zip(live, next_tokens(live_logits, cfg, gen).tolist()))
        live = [r for r in live if not finish_row(rows[r], picked[r], tokens, done, cfg, decode)]
        if on_token is not None:
            for r in live:  # a finished sample's text is its Completion's
                on_token(rows[r], tokens[rows[r]])
        if not live or step == cfg.max_new_tokens - 1:
            break
        finished = len(rows) - len(live)
        if finished and finished >= COMPACT_FINISHED * len(rows):
            cache.keep_rows(torch.tensor(live, device=device))
            picked = {new: picked[old] for new, old in enumerate(live)}
            rows, live = [rows[r] for r in live], list(range(len(live)))
        # a finished row feeds any token (0): its cache and logits are never read again
        ids = torch.tensor([[picked.get(r, 0)] for r in range(len(rows))], device=device)  # [B, 1]
        logits = model(ids, kv_cache=cache, start_pos=T + step).logits[:, -1]
    return [d if d is not None else completion(tokens[i], "length", decode) for i, d in enumerate(done)]


def completion(tokens: list[int], finish: str, decode: Optional[Callable[[list[int]], str]]) -> Completion:
    """A Completion whose text is the whole decoded tokens."""
    return Completion(tokens, decode(tokens) if decode is not None else "", finish)


STOP_WINDOW_MARGIN = 4  # more tokens searched: a decoder may drop a token's text (a skipped special token)


def tail_has_stop(tokens: list[int], stop: Sequence[str], decode: Callable[[list[int]], str]) -> bool:
    """Whether a stop string occurs in the text of the last few tokens, enough to hold any it can have completed.

    A stop string new in the whole text ends in the last token's bytes (the text before it decodes as it did a
    step earlier) and starts at most its UTF-8 length in bytes before; every token decodes to at least one byte,
    so that many tokens before the last one cover it. A character cut at the window's start decodes to U+FFFD
    and UTF-8 resynchronises at the next character, so the text after it is the whole text's.
    """
    window = max(len(s.encode("utf-8")) for s in stop) + 1 + STOP_WINDOW_MARGIN
    tail = decode(tokens[-window:])
    return any(s in tail for s in stop if s)


def finish_row(i: int, tok: int, tokens: list[list[int]], done: list[Optional[Completion]], cfg: SamplingConfig,
               decode: Optional[Callable[[list[int]], str]]) -> bool:
    """Append tok to sample i; record its Completion and return True when EOS or a stop string ends it."""
    if cfg.eos_id is not None and tok == cfg.eos_id:
        done[i] = completion(tokens[i], "eos", decode)
        return True
    tokens[i].append(tok)
    # decoding the whole output at every step would cost quadratic time: look in its tail, cut in the whole once
    if not cfg.stop or not tail_has_stop(tokens[i], cfg.stop, decode):
        return False
    text = decode(tokens[i])  # generated tokens only: a stop string inside the prompt must not end the sample
    cut = first_stop(text, cfg.stop)
    if cut < 0:
        return False  # the window's text differs from the whole text's only at a character cut at its start
    done[i] = Completion(tokens[i], text[:cut], "stop")
    return True


def sample(model: GPT, prompts: list[list[int]], cfg: SamplingConfig,
           decode: Optional[Callable[[list[int]], str]] = None,
           on_token: Optional[Callable[[int, int, list[int]], None]] = None) -> list[list[Completion]]:
    """cfg.n completions per prompt (token ids), reproducible for a given cfg.seed on a given device."""
    if cfg.stop and decode is None:
        raise ValueError("stop strings need a decode function to find them in the generated text")
    if cfg.n < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"n ({cfg.n}) and max_new_tokens ({cfg.max_new_tokens}) must be at least 1")
    for p in prompts:  # all refused before any work is done
        check_prompt(len(p), cfg.max_new_tokens, model.config.n_positions)
    # greedy draws nothing (and a generator cannot live on every device, e.g. meta)
    gen = torch.Generator(device=model_device(model)).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    was_training = model.training
    model.eval()
    try:
        return [sample_prompt(model, p, cfg, gen, decode,
                              None if on_token is None else functools.partial(on_token, j))
                for j, p in enumerate(prompts)]
    finally:
        model.train(was_training)


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
