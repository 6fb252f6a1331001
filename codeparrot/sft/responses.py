"""Responses of a fine-tuned model: a sample during training, and one per test record scored at the end.

A response is the greedy continuation of the record's prompt (format.format_prompt), up to EOS or max_new_tokens,
with a repeated "### Response:" header removed (the chapter's extraction). Scores: exact match with the record's
output, syntax-valid (non-empty and `ast.parse`: the outputs are Python), and stopped at EOS (the model learned to
stop); a prompt that leaves no room in the context gets an empty response, counted as prompt_fills_context.
"""
from __future__ import annotations

import ast
import functools
import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..sampler import SamplingConfig, sample
from .format import format_prompt

log = logging.getLogger(__name__)


HEADER = "### Response:"


def extract_response(text: str) -> str:
    """The response in generated text: without a response header the model may repeat, stripped."""
    return text.replace(HEADER, "").strip()


def fold_blank_lines(text: str) -> str:
    """Text for a log or summary: each run of two or more blank lines as one `[N blank lines]` line."""
    return re.sub(r"\n(?:[ \t]*\n){2,}", lambda m: f"\n[{m.group(0).count(chr(10)) - 1} blank lines]\n", text)


def shown(raw: str, finish: str) -> str:
    """A response as logs and summaries show it: blank-line runs folded, and an empty one said why (an undertrained
    model's greedy output can be nothing but newlines, which extraction strips to "")."""
    response = extract_response(raw)
    if response:
        return fold_blank_lines(response)
    if finish == "no_room":
        return "(none: the prompt fills the model's context)"
    if not raw:
        return "(empty: the model ended with EOS at once)"
    what = "whitespace and response headers" if HEADER in raw else "whitespace"
    return f"(blank: the model generated only {what}, {raw.count(chr(10))} newlines, until {finish})"


def is_python(text: str) -> bool:
    """Whether text parses as Python."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def generate_raw(model, tokenizer, record: dict[str, str], eos_id: int, max_new_tokens: int) -> tuple[str, str]:
    """(generated text as it came, finish: eos, length or no_room) of one record, greedy, in the model's context."""
    tokenizer.encode_special_tokens = True  # as training encoded it: special strings in user text stay text
    ids = tokenizer.encode(format_prompt(record), add_special_tokens=False).ids
    room = min(max_new_tokens, model.config.n_positions - len(ids))
    if room < 1:
        return "", "no_room"
    cfg = SamplingConfig(n=1, max_new_tokens=room, temperature=0.0, eos_id=eos_id)
    # Eagerly, past the blocks prepare_model compiled in place for training: through them the KV-cache path traces
    # graphs with breaks and recompiles per prompt length (measured: 3.4 s against 0.02 s eager).
    with torch.compiler.set_stance("force_eager"):
        done = sample(model, [ids], cfg, functools.partial(tokenizer.decode, skip_special_tokens=False))[0][0]
    return done.text, done.finish


def respond(model, tokenizer, record: dict[str, str], eos_id: int, max_new_tokens: int) -> tuple[str, str]:
    """(response, finish: eos, length or no_room) of one record, greedy, in the model's context."""
    raw, finish = generate_raw(model, tokenizer, record, eos_id, max_new_tokens)
    return extract_response(raw), finish


class ResponseWriter:
    """The response to one instruction (the first validation record) at chosen moments: logged and kept."""

    def __init__(self, acc, model, tokenizer, record: dict[str, str], eos_id: int, max_new_tokens: int,
                 path: Path) -> None:
        self.acc, self.model, self.tokenizer, self.record = acc, model, tokenizer, record
        self.eos_id, self.max_new_tokens, self.path = eos_id, max_new_tokens, path

    def sample(self, step: int, when: str) -> Optional[str]:
        """Generate on the main process; append {step, when, response} to logs/samples.jsonl."""
        if not self.acc.is_main_process:
            return None
        with torch.no_grad(), self.acc.autocast():
            raw, finish = generate_raw(self.acc.unwrap_model(self.model), self.tokenizer, self.record, self.eos_id,
                                       self.max_new_tokens)
        log.info("sft @ step %d (%s): response to %r:\n%s", step, when, self.record["instruction"][:60],
                 shown(raw, finish))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        response = extract_response(raw)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, "when": when, "response": response, "finish": finish}) + "\n")
        return response


def score(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Exact-match, syntax-valid and stopped-at-EOS rates over scored rows."""
    n = max(1, len(rows))
    return {"test_records": len(rows),
            "exact_match": round(sum(r["exact_match"] for r in rows) / n, 4),
            "syntax_valid": round(sum(r["syntax_valid"] for r in rows) / n, 4),
            "stopped_at_eos": round(sum(r["finish"] == "eos" for r in rows) / n, 4),
            "prompt_fills_context": sum(r["finish"] == "no_room" for r in rows)}


def score_test_split(acc, model, tokenizer, records: list[dict[str, str]], eos_id: int, max_new_tokens: int, out: Path,
                   fingerprint: str) -> dict[str, Any]:
    """A response for every test record (main process), scored, written to `responses.json`; the scores."""
    acc.wait_for_everyone()
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return {}
    gpt, rows, raws = acc.unwrap_model(model), [], []
    with torch.no_grad(), acc.autocast():
        for record in records:
            raw, finish = generate_raw(gpt, tokenizer, record, eos_id, max_new_tokens)
            response = extract_response(raw)
            raws.append(raw)
            rows.append({**record, "model_response": response, "finish": finish,
                         "exact_match": response == record["output"].strip(),
                         "syntax_valid": bool(response) and is_python(response)})
    metrics = score(rows)
    path = out / "responses.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "metrics": metrics, "records": rows}, indent=2) + "\n")
    tmp.replace(path)  # last: its presence with this fingerprint marks the stage done
    log.info("sft: %d test responses, exact match %.3f, syntax-valid %.3f, stopped at EOS %.3f", len(rows),
             metrics["exact_match"], metrics["syntax_valid"], metrics["stopped_at_eos"])
    acc.wait_for_everyone()
    return {**metrics, "responses": str(path), **example(rows, raws)}


def example(rows: list[dict[str, Any]], raws: list[str]) -> dict[str, str]:
    """The summary's example: the first test record whose prompt left room for a response, as `shown` says it."""
    if not rows:
        return {}
    i = next((i for i, r in enumerate(rows) if r["finish"] != "no_room"), 0)
    return {"example_input": rows[i]["input"], "example_response": shown(raws[i], rows[i]["finish"]),
            "example_finish": rows[i]["finish"]}
