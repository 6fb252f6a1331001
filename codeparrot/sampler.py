"""The KV-cached batched sampler: prefill each prompt once, then decode its n samples together, with temperature,
top-k / nucleus filtering, EOS and stop strings; reproducible for a seed on a device."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .model import GPT, KVCache, model_device


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
