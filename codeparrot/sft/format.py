"""The instruction format of the GPT-2 instruction-tuning chapter (Alpaca's), and how a record becomes tokens."""
from __future__ import annotations

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def format_prompt(record: dict[str, str]) -> str:
    """The chapter's prompt: preamble, instruction, an input section only when there is input, the response header."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


def encode_record(record: dict[str, str], tokenizer) -> tuple[list[int], int]:
    """(prompt + response tokens, number of prompt tokens); special strings in the text stay text, so the only
    EOS of a row is the one collate appends."""
    tokenizer.encode_special_tokens = True
    prompt = tokenizer.encode(format_prompt(record), add_special_tokens=False).ids
    response = tokenizer.encode(record["output"], add_special_tokens=False).ids
    return prompt + response, len(prompt)
