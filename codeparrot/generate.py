"""Batched sampling with a static KV cache: prefill each prompt once, then decode its n samples together."""
from __future__ import annotations

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


def check_prompt(n_prompt: int, max_new_tokens: int, n_positions: int) -> None:
    """Refuse a prompt whose completion would not fit the context: cropping would silently change the prompt."""
    if n_prompt == 0:
        raise ValueError("empty prompt: give at least one token (e.g. EOS)")
    if n_prompt + max_new_tokens > n_positions:
        raise ValueError(f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} = "
                         f"{n_prompt + max_new_tokens} exceeds the model's context n_positions {n_positions}; "
                         f"shorten the prompt to at most {n_positions - max_new_tokens} tokens or lower max_new_tokens")


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


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Pick one token per row of logits [B, V]: argmax at temperature 0, else a filtered softmax sample."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(1)  # [B]


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


@torch.no_grad()
def sample_prompt(model: GPT, prompt: list[int], cfg: SamplingConfig, gen: torch.Generator,
                  decode: Optional[Callable[[list[int]], str]]) -> list[Completion]:
    """cfg.n completions of one prompt: prefill [1, T] once, repeat the cache to n rows, decode them together."""
    T = len(prompt)
    device = model_device(model)
    cache = KVCache(model.config.n_layer, T + cfg.max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache).logits[:, -1]  # [1, V]
    cache.repeat_rows(cfg.n)
    logits = logits.expand(cfg.n, -1)  # [n, V]
    tokens: list[list[int]] = [[] for _ in range(cfg.n)]
    done: list[Optional[Completion]] = [None] * cfg.n
    active = list(range(cfg.n))  # sample index of each row still in the batch
    for step in range(cfg.max_new_tokens):
        picked = next_tokens(logits, cfg, gen).tolist()
        keep = [r for r, (i, tok) in enumerate(zip(active, picked))
                if not finish_row(i, tok, tokens, done, cfg, decode)]
        if not keep or step == cfg.max_new_tokens - 1:
            break
        if len(keep) < len(active):  # finished rows leave the batch, so they cost nothing further
            rows = torch.tensor(keep, device=device)
            cache.keep_rows(rows)
            active = [active[r] for r in keep]
        ids = torch.tensor([[picked[r]] for r in keep], device=device)  # [B', 1]
        logits = model(ids, kv_cache=cache, start_pos=T + step).logits[:, -1]
    return [d if d is not None else completion(tokens[i], "length", decode) for i, d in enumerate(done)]


def completion(tokens: list[int], finish: str, decode: Optional[Callable[[list[int]], str]]) -> Completion:
    """A Completion whose text is the whole decoded tokens."""
    return Completion(tokens, decode(tokens) if decode is not None else "", finish)


def finish_row(i: int, tok: int, tokens: list[list[int]], done: list[Optional[Completion]], cfg: SamplingConfig,
               decode: Optional[Callable[[list[int]], str]]) -> bool:
    """Append tok to sample i; record its Completion and return True when EOS or a stop string ends it."""
    if cfg.eos_id is not None and tok == cfg.eos_id:
        done[i] = completion(tokens[i], "eos", decode)
        return True
    tokens[i].append(tok)
    if not cfg.stop:
        return False
    text = decode(tokens[i])  # generated tokens only: a stop string inside the prompt must not end the sample
    cut = first_stop(text, cfg.stop)
    if cut < 0:
        return False
    done[i] = Completion(tokens[i], text[:cut], "stop")
    return True


def sample(model: GPT, prompts: list[list[int]], cfg: SamplingConfig,
           decode: Optional[Callable[[list[int]], str]] = None) -> list[list[Completion]]:
    """cfg.n completions per prompt (token ids), reproducible for a given cfg.seed on a given device."""
    if cfg.stop and decode is None:
        raise ValueError("stop strings need a decode function to find them in the generated text")
    if cfg.n < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"n ({cfg.n}) and max_new_tokens ({cfg.max_new_tokens}) must be at least 1")
    for p in prompts:  # all refused before any work is done
        check_prompt(len(p), cfg.max_new_tokens, model.config.n_positions)
    gen = torch.Generator(device=model_device(model)).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        return [sample_prompt(model, p, cfg, gen, decode) for p in prompts]
    finally:
        model.train(was_training)
