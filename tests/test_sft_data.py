"""Instruction records: the prompt format, docstring mining, Alpaca files, and the `sft-data` stage."""
from __future__ import annotations

import copy
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import pytest

from codeparrot.corpus.source import list_shards
from codeparrot.sft.data import (DOCSTRING_INSTRUCTION, SFT_DATA, in_order, lengths_figure, mine_docstrings,
                                 read_alpaca, split_in_order)
from codeparrot.sft.format import PREAMBLE, format_prompt

from conftest import STDLIB, free_port, read_all, summaries
from loopback_hub import HubServer, let_online

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


def test_sft_data_from_a_file_needs_no_clean_corpus(trained_tokenizer, tmp_path):
    cfg, _ = trained_tokenizer
    cfg = copy.deepcopy(cfg)
    source = tmp_path / "alpaca.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Add {i}.", "input": "", "output": f"x + {i}"}) + "\n"
                              for i in range(20)))
    cfg.paths.sft, cfg.paths.clean, cfg.sft.source = str(tmp_path / "sft"), str(tmp_path / "no-clean"), str(source)
    assert SFT_DATA.run(cfg)["skipped"] is False  # clean/ is read for docstrings only
    assert len((tmp_path / "sft" / "train.jsonl").read_text().splitlines()) == 17
    cfg.sft.source = "docstrings"
    with pytest.raises(FileNotFoundError, match="run `codeparrot prepare` first"):
        SFT_DATA.run(cfg)


def sorted_alpaca_file(path: Path) -> list[dict]:
    """200 records sorted by kind (100 short tasks, then 100 long ones) and two bad lines; the good records."""
    good = [{"instruction": f"{kind} task {i}", "input": "", "output": f"{kind} answer {i}"}
            for kind in ("short", "long") for i in range(100)]
    lines = [json.dumps(r) for r in good[:50]] + ["{not json", json.dumps({"instruction": "no output"})]
    path.write_text("\n".join(lines + [json.dumps(r) for r in good[50:]]) + "\n")
    return good


def kinds(records: list[dict]) -> Counter:
    """How many records of each kind."""
    return Counter(r["instruction"].split()[0] for r in records)


def test_a_sorted_file_is_shuffled_with_a_seed_before_the_split_and_drops_reach_the_console(trained_tokenizer,
                                                                                             tmp_path, capsys):
    from codeparrot.cli import _summary

    cfg = copy.deepcopy(trained_tokenizer[0])
    good = sorted_alpaca_file(tmp_path / "sorted.jsonl")
    cfg.paths.sft, cfg.sft.source = str(tmp_path / "sft"), str(tmp_path / "sorted.jsonl")
    result = SFT_DATA.run(cfg)
    splits = written(cfg)
    assert (len(splits["train"]), len(splits["test"]), len(splits["valid"])) == (170, 20, 10)
    assert sorted(map(json.dumps, sum(splits.values(), []))) == sorted(map(json.dumps, good))  # none lost
    for split in ("test", "valid"):  # file order put only "long" tasks here; shuffled, both kinds share each split
        assert min(kinds(splits[split]).values()) >= len(splits[split]) // 4, (split, kinds(splits[split]))
    report = json.loads((tmp_path / "sft" / "report.json").read_text())
    assert report["order"] == result["order"] == "shuffled (seed 1)"
    assert result["dropped"] == report["filters"] == {"invalid_json": 1, "missing_fields": 1}

    again = copy.deepcopy(cfg)
    again.paths.sft = str(tmp_path / "again")
    SFT_DATA.run(again)
    assert written(again) == splits  # the same seed, the same split
    again.train.seed = 2  # another seed is another order, so the stage runs again
    assert SFT_DATA.run(again)["order"] == "shuffled (seed 2)" and written(again) != splits

    cfg.paths.sft, cfg.sft.shuffle_records = str(tmp_path / "ordered"), False
    capsys.readouterr()
    _summary("sft-data", SFT_DATA.run(cfg))  # what the command prints of the stage's counts
    summary = summaries(capsys.readouterr().out)["sft-data"]
    assert summary["order"] == "file order"
    assert json.loads(summary["dropped"]) == {"invalid_json": 1, "missing_fields": 1}
    assert kinds(written(cfg)["valid"]) == {"long": 10}  # file order: the sorted file's last kind only


def test_the_lengths_plot_says_what_range_it_shows():
    fig = lengths_figure({"train": list(range(30, 82)), "valid": [40, 50]}, 128)
    label = fig.axes[0].get_xlabel()
    assert label == "tokens (prompt + response + EOS); longest 81"  # was: "shown up to 140 (the 99th percentile)"
    assert fig.axes[0].get_xlim()[1] >= 128  # the allowed_max_length line stays in view
    tail = lengths_figure({"train": [50] * 200 + [5000] * 3}, 100).axes[0].get_xlabel()
    assert tail.endswith("3 longer than 110 (allowed_max_length 100 + 10%) not shown, longest 5000")
    wide = lengths_figure({"train": list(range(1, 1001))}, 10).axes[0].get_xlabel()
    assert wide.endswith("10 longer than 990 (the 99th percentile) not shown, longest 1000")


def test_sft_data_refuses_a_missing_source_file(trained_tokenizer, tmp_path):
    cfg, _ = trained_tokenizer
    cfg = copy.deepcopy(cfg)
    cfg.paths.sft, cfg.sft.source = str(tmp_path / "sft"), str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        SFT_DATA.run(cfg)


# --- sft.source=hub:<repo_id>: an Alpaca dataset on the loopback Hub (tests/loopback_hub.py), read with datasets ---

HUB_TOKEN = "hf_sft_data_test_secret_41c9"
DATASET = "parrot/alpaca-code"
STDLIB_MODULES = ("textwrap.py", "shlex.py", "calendar.py")  # 44 documented public functions in CPython 3.11
BAD = [{"instruction": "no output"}, {"output": "no instruction"}, {"instruction": "null output", "output": None}]


def alpaca_pairs(n: int) -> list[dict]:
    """`n` Alpaca records mined from real stdlib modules; the first has no `input` key (the chapter's may not)."""
    counts: Counter = Counter()
    pairs = [pair for name in STDLIB_MODULES
             for pair in mine_docstrings((STDLIB / name).read_text(encoding="utf-8"), name, 20, 2, counts)][:n]
    assert len(pairs) == n
    pairs[0] = {"instruction": pairs[0]["instruction"], "output": pairs[0]["output"]}
    return pairs


def write_dataset(layout: str, rows: list[dict], folder: Path) -> Path:
    """`rows` in `folder` as tatsu-lab/alpaca stores them (parquet), as .jsonl, or as the chapter's JSON list; the
    file written."""
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "data" / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True)
        schema = pa.schema([(name, pa.string()) for name in ("instruction", "input", "output")])  # absent: null
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        return path
    folder.mkdir(parents=True)
    if layout == "jsonl":
        path = folder / "alpaca.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path = folder / "instruction-data.json"
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def dataset_hub(tmp_path, monkeypatch):
    """The loopback Hub, with this process let online for it (offline mode blocks loopback too), no Xet, the token
    in HF_TOKEN, and the Hub's download cache under tmp_path."""
    let_online(monkeypatch, tmp_path / "hf", HUB_TOKEN)
    with HubServer(tmp_path / "hub", token=HUB_TOKEN).start() as server:
        yield server


def hub_config(trained_tokenizer, tmp_path, source: str, endpoint: str):
    """The fixture's config writing sft/ under tmp_path from `source`, with hub.endpoint set (not HF_ENDPOINT)."""
    cfg = copy.deepcopy(trained_tokenizer[0])
    cfg.paths.sft, cfg.sft.source, cfg.hub.endpoint = str(tmp_path / "sft"), source, endpoint
    return cfg


def written(cfg) -> dict[str, list[dict]]:
    """The records of each split that the stage wrote."""
    out = Path(cfg.paths.sft)
    return {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in
            ("train", "valid", "test")}


@pytest.mark.parametrize("layout", ["parquet", "jsonl", "json"])
def test_sft_data_reads_an_alpaca_dataset_from_the_hub_and_reruns_on_a_new_commit(trained_tokenizer, tmp_path,
                                                                                  dataset_hub, layout, caplog):
    from huggingface_hub import HfApi

    caplog.set_level(logging.DEBUG)
    api = HfApi(endpoint=dataset_hub.endpoint, token=HUB_TOKEN)
    api.create_repo(DATASET, repo_type="dataset")
    pairs = alpaca_pairs(44)
    first = pairs[:40]
    rows = first[:10] + BAD + first[10:]  # bad records among good ones, in file order
    path = write_dataset(layout, rows, tmp_path / "v1")
    api.upload_folder(repo_id=DATASET, repo_type="dataset", folder_path=str(tmp_path / "v1"))
    cfg = hub_config(trained_tokenizer, tmp_path, f"hub:{DATASET}", dataset_hub.endpoint)

    result = SFT_DATA.run(cfg)
    assert result["skipped"] is False
    assert (result["train_records"], result["test_records"], result["valid_records"]) == (34, 4, 2)  # 85/10/5
    expected = [{"input": "", **r} for r in first]  # an absent input is an empty one, as in a local file
    assert written(cfg) == split_in_order(in_order(expected, "shuffled (seed 1)", 1), 0.85, 0.10)  # shuffled
    report = json.loads((tmp_path / "sft" / "report.json").read_text())
    assert report["filters"] == {"missing_fields": 3} and report["source"] == f"hub:{DATASET}"
    assert report["order"] == result["order"] == "shuffled (seed 1)" and result["dropped"] == {"missing_fields": 3}
    v1 = api.dataset_info(DATASET).sha
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["inputs"]["source"] == v1  # the resolved commit is the source's identity

    assert SFT_DATA.run(cfg)["skipped"] is True  # the same commit: up to date
    more = write_dataset(layout, rows + pairs[40:], tmp_path / "v2")
    api.upload_file(repo_id=DATASET, repo_type="dataset", path_or_fileobj=str(more),
                    path_in_repo=path.relative_to(tmp_path / "v1").as_posix(), commit_message="four more records")
    again = SFT_DATA.run(cfg)
    assert again["skipped"] is False and again["train_records"] == int(44 * 0.85)  # the new commit re-ran it

    cfg.sft.source = f"hub:{DATASET}@{v1}"  # a pinned revision reads that commit, whatever main holds now
    assert SFT_DATA.run(cfg)["train_records"] == 34
    assert f"Bearer {HUB_TOKEN}" in dataset_hub.seen_authorization  # reads send HF_TOKEN's token...
    assert HUB_TOKEN not in caplog.text  # ...and log none of it


def test_sft_data_from_a_hub_that_is_not_there_fails_fast_and_clearly(trained_tokenizer, tmp_path, dataset_hub,
                                                                      capsys):
    import time

    from codeparrot.cli import main
    from codeparrot.hub import HubError

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = hub_config(trained_tokenizer, tmp_path, f"hub:{DATASET}", dead)
    start = time.perf_counter()
    with pytest.raises(HubError, match=f"hub:{DATASET}.*cannot resolve dataset {DATASET}@main on {dead}"):
        SFT_DATA.run(cfg)
    assert time.perf_counter() - start < 10
    missing = hub_config(trained_tokenizer, tmp_path, "hub:parrot/no-such-dataset", dataset_hub.endpoint)
    with pytest.raises(HubError, match=f"parrot/no-such-dataset@main on {dataset_hub.endpoint}"):
        SFT_DATA.run(missing)
    # the command prints one line, not a traceback
    assert main(["sft-data", f"paths.workdir={cfg.paths.workdir}", f"paths.sft={tmp_path / 'cli-sft'}",
                 f"sft.source=hub:{DATASET}", f"hub.endpoint={dead}"]) == 2
    err = capsys.readouterr().err
    assert f"error: sft.source=hub:{DATASET}: cannot resolve dataset {DATASET}@main on {dead}" in err
    assert "Traceback" not in err and HUB_TOKEN not in err


def test_sft_data_from_the_hub_without_datasets_says_how_to_install_it(trained_tokenizer, tmp_path, monkeypatch):
    from codeparrot.config import ConfigError

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    cfg = hub_config(trained_tokenizer, tmp_path, f"hub:{DATASET}", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"pip install 'codeparrot\[sft\]'"):
        SFT_DATA.run(cfg)


def test_sft_data_from_the_hub_in_offline_mode_says_so(trained_tokenizer, tmp_path):
    from codeparrot.config import ConfigError

    cfg = hub_config(trained_tokenizer, tmp_path, f"hub:{DATASET}", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1"):  # conftest sets it for every test
        SFT_DATA.run(cfg)
