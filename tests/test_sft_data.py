"""Instruction records: the prompt format, docstring mining, Alpaca files, and the `sft-data` stage."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from codeparrot.corpus.source import list_shards
from codeparrot.sft.data import DOCSTRING_INSTRUCTION, SFT_DATA, mine_docstrings, read_alpaca, split_in_order
from codeparrot.sft.format import PREAMBLE, format_prompt

from conftest import read_all

FIXTURE = '''\
import functools


def area(width, height):
    """Area of a width x height rectangle, in square units."""
    result = width * height
    return result


def __dunder__(x):
    """A dunder function that is never a pair."""
    y = x
    return y


def _private(x):
    """A private helper that is never a pair either."""
    y = x
    return y


def test_area():
    """Tests are not instructions to write code."""
    assert area(2, 3) == 6
    assert area(0, 3) == 0


def short_doc(x):
    """Tiny."""
    y = x
    return y


def short_body(x):
    """A docstring long enough, over a body too short."""
    return x


class Shape:
    @functools.lru_cache(maxsize=None)
    def perimeter(self, a, b):
        """Perimeter of a rectangle with sides a and b."""
        total = 2 * (a + b)
        return total
'''


def test_prompt_format_is_the_chapters_with_and_without_input():
    record = {"instruction": "Convert to upper case.", "input": "hello", "output": "HELLO"}
    assert format_prompt(record) == (f"{PREAMBLE}\n\n### Instruction:\nConvert to upper case.\n\n### Input:\nhello"
                                     "\n\n### Response:\n")
    assert format_prompt({**record, "input": ""}) == (f"{PREAMBLE}\n\n### Instruction:\nConvert to upper case."
                                                      "\n\n### Response:\n")
    assert PREAMBLE == ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.")


def test_docstring_mining_keeps_documented_public_functions_and_counts_the_rest():
    counts: Counter = Counter()
    pairs = list(mine_docstrings(FIXTURE, "pkg/shapes.py", min_doc=20, min_body=2, counts=counts))
    assert counts == {"functions_kept": 2, "dunder": 1, "private": 1, "test": 1, "short_docstring": 1,
                      "short_body": 1}
    area, perimeter = pairs
    assert area["instruction"] == DOCSTRING_INSTRUCTION
    assert area["input"] == 'def area(width, height):\n    """Area of a width x height rectangle, in square units."""'
    assert area["output"].startswith("def area(width, height):") and area["output"].endswith("return result\n")
    assert perimeter["input"].startswith("def perimeter(self, a, b):")  # the decorator is not in the stub...
    assert perimeter["output"].startswith("@functools.lru_cache")  # ...but is in the answer, dedented
    compile(perimeter["output"], "<pair>", "exec")
    assert list(mine_docstrings("def broken(:\n", "x.py", 20, 2, counts)) == [] and counts["unparsable_file"] == 1


def test_alpaca_files_skip_and_count_bad_lines_and_split_in_file_order(tmp_path):
    good = [{"instruction": f"task {i}", "input": "" if i % 2 else "x", "output": f"answer {i}"} for i in range(20)]
    lines = [json.dumps(r) for r in good[:10]] + ["{not json", json.dumps({"instruction": "no output"}),
                                                  json.dumps(["a list"])] + [json.dumps(r) for r in good[10:]]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    counts: Counter = Counter()
    records = read_alpaca(path, counts)
    assert records == good and counts == {"invalid_json": 1, "missing_fields": 2}
    splits = split_in_order(records, 0.85, 0.10)
    assert splits["train"] == good[:17] and splits["test"] == good[17:19] and splits["valid"] == good[19:]
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps([{k: v for k, v in r.items() if k != "input"} for r in good]))
    assert [r["input"] for r in read_alpaca(as_list, Counter())] == [""] * 20  # input may be absent


def test_sft_data_stage_mines_train_from_train_and_held_out_from_valid(trained_tokenizer, tmp_path):
    cfg, _ = trained_tokenizer
    cfg = copy.deepcopy(cfg)
    cfg.paths.sft = str(tmp_path / "sft")
    cfg.sft.min_docstring_chars = 10
    result = SFT_DATA.run(cfg)
    out = tmp_path / "sft"
    report = json.loads((out / "report.json").read_text())
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in
            ("train", "valid", "test")}
    assert result["train_records"] == len(rows["train"]) > 0 and report["splits"]["train"]["records"] > 0
    assert report["filters"]["functions_kept"] >= len(rows["train"]) + len(rows["valid"]) + len(rows["test"])
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_text = "".join(r["content"] for r in read_all(list_shards(cfg.paths.resolve("clean") / "train")))
    valid_text = "".join(r["content"] for r in read_all(list_shards(cfg.paths.resolve("clean") / "valid")))
    assert all(r["output"].splitlines()[0].strip() in train_text for r in rows["train"][:20])
    assert all(r["output"].splitlines()[0].strip() in valid_text for r in rows["valid"] + rows["test"])
    assert SFT_DATA.run(cfg)["skipped"] is True
    cfg.sft.mask_prompt = True  # a training key: the records stay as they are
    assert SFT_DATA.run(cfg)["skipped"] is True


def test_sft_data_refuses_a_missing_source_file(trained_tokenizer, tmp_path):
    cfg, _ = trained_tokenizer
    cfg = copy.deepcopy(cfg)
    cfg.paths.sft, cfg.sft.source = str(tmp_path / "sft"), str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        SFT_DATA.run(cfg)
