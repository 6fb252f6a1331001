"""The `sft-data` stage: instruction records (instruction, input, output) from docstrings, a user's Alpaca file or
an Alpaca dataset on the Hugging Face Hub (`hub:<repo_id>[@revision]`, read with `datasets`).

Records are written as `sft/{train,valid,test}.jsonl`, with `report.json` (the order split, counts per filter and
split, token lengths) and `lengths.png`. A file's or a Hub dataset's records are shuffled (seeded) before the split
unless sft.shuffle_records=false. The prompt format is the Alpaca one of the GPT-2 instruction-tuning chapter.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import random
import tempfile
import textwrap
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

from ..config import Config, ConfigError, HubConfig
from ..corpus.source import BadRecords, iter_records, list_shards
from ..hub import HUB_PREFIX, HubError, endpoint, hub_api, parse_hub_spec, scrub
from ..stage import Stage
from .format import format_prompt

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DOCSTRING_INSTRUCTION = "Implement the Python function described by this signature and docstring."


def skip_reason(node: ast.FunctionDef | ast.AsyncFunctionDef, path: str, min_doc: int, min_body: int) -> str | None:
    """Why a function makes no instruction pair (dunder, private, test, short docstring or body), or None."""
    name = node.name
    if name.startswith("__") and name.endswith("__"):
        return "dunder"
    if name.startswith("_"):
        return "private"
    if name.startswith("test") or "/test" in f"/{path}" or Path(path).name.startswith("test_"):
        return "test"
    doc = ast.get_docstring(node)
    if not doc or len(doc) < min_doc:
        return "short_docstring"
    body = node.body[1:]  # after the docstring
    if sum((b.end_lineno or b.lineno) - b.lineno + 1 for b in body) < min_body:
        return "short_body"
    return None


def function_pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> dict[str, str]:
    """(instruction, input: signature + docstring, output: the whole function with its decorators), dedented."""
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno  # 1-based line numbers
    text = textwrap.dedent("".join(lines[first - 1:node.end_lineno]))
    own = text.splitlines()
    stub = own[node.lineno - first:node.body[1].lineno - first]  # from `def` to just before the first statement
    return {"instruction": DOCSTRING_INSTRUCTION, "input": "\n".join(stub).rstrip(), "output": text.rstrip() + "\n"}


BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")  # the statement lists a function can sit in


def function_nodes(body: list) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function (methods and nested ones too) among statements, without visiting expressions: ast.walk's
    visit of every node was most of the stage's time."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for block in BLOCKS:
            yield from function_nodes(getattr(node, block, ()))


def mine_docstrings(source: str, path: str, min_doc: int, min_body: int, counts: Counter) -> Iterator[dict[str, str]]:
    """The instruction pairs of one file's functions (methods included), counting every skip by its reason."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        counts["unparsable_file"] += 1
        return
    lines = source.splitlines(keepends=True)
    for node in function_nodes(tree.body):
        reason = skip_reason(node, path, min_doc, min_body)
        if reason:
            counts[reason] += 1
            continue
        counts["functions_kept"] += 1
        yield function_pair(node, lines)


def docstring_records(clean: Path, split: str, cfg: Config, bad: BadRecords, counts: Counter) -> list[dict]:
    """Pairs mined from the cleaned corpus split, deduplicated by output."""
    s = cfg.sft
    seen: set[bytes] = set()
    out = []
    for n, record in enumerate(iter_records(list_shards(clean / split), bad)):
        if 0 < s.max_files <= n:
            break
        for pair in mine_docstrings(record["content"], record.get("path", ""), s.min_docstring_chars,
                                    s.min_body_lines, counts):
            digest = hashlib.sha1(pair["output"].encode("utf-8", "surrogatepass")).digest()
            if digest in seen:
                counts["duplicate"] += 1
                continue
            seen.add(digest)
            out.append(pair)
    return out


def read_alpaca(path: Path, counts: Counter) -> list[dict[str, str]]:
    """Records of a user's Alpaca-format .json (a list) or .jsonl; bad lines and records are skipped and counted."""
    if path.suffix == ".json":
        try:
            rows: Iterable[Any] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON list of records ({e})") from None
    else:
        rows = _jsonl_rows(path, counts)
    return alpaca_records(rows, counts)


def alpaca_records(rows: Iterable[Any], counts: Counter) -> list[dict[str, str]]:
    """The rows with string `instruction` and `output` (and `input`, which may be absent); the rest counted as
    missing_fields."""
    records = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or \
                not isinstance(row.get("output"), str) or not isinstance(row.get("input", ""), str):
            counts["missing_fields"] += 1
            continue
        records.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    return records


def _jsonl_rows(path: Path, counts: Counter) -> Iterator[Any]:
    """The parsed lines of a .jsonl, a bad line counted and skipped."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            counts["invalid_json"] += 1


def split_in_order(records: list[dict], train_fraction: float, test_fraction: float) -> dict[str, list[dict]]:
    """The chapter's split, in the records' order: the first 85% train, the next 10% test, the rest validation."""
    n_train, n_test = int(len(records) * train_fraction), int(len(records) * test_fraction)
    return {"train": records[:n_train], "valid": records[n_train + n_test:],
            "test": records[n_train:n_train + n_test]}


def record_order(cfg: Config) -> str:
    """How records are ordered before the split: "shuffled (seed N)" or "file order" (sft.shuffle_records)."""
    shuffle = cfg.sft.shuffle_records
    if shuffle is None:  # a user's file is often sorted (by task, by length): its order would pick valid and test
        shuffle = cfg.sft.source != "docstrings"
    return f"shuffled (seed {cfg.train.seed})" if shuffle else "file order"


def in_order(records: list[dict], order: str, seed: int) -> list[dict]:
    """The records in `order`: as they are, or shuffled by `seed` (the same seed, the same order)."""
    if order == "file order":
        return records
    out = list(records)
    random.Random(seed).shuffle(out)
    return out


def build_splits(cfg: Config, counts: Counter) -> dict[str, list[dict]]:
    """The records of each split from `sft.source`, in the order record_order names."""
    s = cfg.sft
    order, seed = record_order(cfg), cfg.train.seed
    if s.source == "docstrings":
        clean = cfg.paths.resolve("clean")
        bad = BadRecords(max_ratio=cfg.corpus.max_bad_ratio)
        train = in_order(docstring_records(clean, "train", cfg, bad, counts), order, seed)
        held_out = in_order(docstring_records(clean, "valid", cfg, bad, counts), order, seed)
        # pretraining's valid files give validation and test pairs: none of them was trained on
        half = int(len(held_out) * s.valid_share_of_held_out)
        splits = {"train": train, "valid": held_out[:half], "test": held_out[half:]}
    elif s.source.startswith(HUB_PREFIX):
        records = in_order(read_hub_alpaca(s.source, cfg.hub, counts), order, seed)
        splits = split_in_order(records, s.train_fraction, s.test_fraction)
    else:
        records = in_order(read_alpaca(Path(s.source), counts), order, seed)
        splits = split_in_order(records, s.train_fraction, s.test_fraction)
    return splits


def require_datasets(spec: str) -> ModuleType:
    """The `datasets` module, imported only now (it takes seconds), or a ConfigError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"sft.source={spec} is read with the `datasets` library, which is not installed: "
                          "pip install 'codeparrot[sft]'") from None
    return datasets


def resolve_hub_dataset(spec: str, h: HubConfig) -> tuple[str, str]:
    """(repo_id, commit sha) of the dataset revision `hub:<repo_id>[@revision]` names now."""
    repo_id, revision = parse_hub_spec(spec)
    api = hub_api(h)
    try:
        return repo_id, api.dataset_info(repo_id, revision=revision).sha
    except Exception as e:  # connection refused, no such repo or revision, bad token: all end the stage here
        raise HubError(f"sft.source={spec}: cannot resolve dataset {repo_id}@{revision} on {endpoint(h)}: "
                       f"{scrub(f'{type(e).__name__}: {e}', api)}") from None


def read_hub_alpaca(spec: str, h: HubConfig, counts: Counter) -> list[dict[str, str]]:
    """The train split of an Alpaca dataset on the Hub at its current commit; records without the fields counted."""
    from huggingface_hub import snapshot_download

    datasets = require_datasets(spec)
    # resolved again (a build sees only the config): should a commit land since the manifest's, the next run
    # finds the manifest's sha stale and builds again
    repo_id, sha = resolve_hub_dataset(spec, h)
    api = hub_api(h)
    # huggingface_hub downloads (into its cache), since it takes the endpoint as an argument: datasets reads
    # HF_ENDPOINT once, at import, so hub.endpoint could not reach load_dataset(repo_id) without patching it.
    try:
        local = snapshot_download(repo_id, repo_type="dataset", revision=sha, endpoint=endpoint(h), token=api.token)
    except Exception as e:
        raise HubError(f"sft.source={spec}: cannot download dataset {repo_id}@{sha[:12]} from {endpoint(h)}: "
                       f"{scrub(f'{type(e).__name__}: {e}', api)}") from None
    with tempfile.TemporaryDirectory() as scratch:  # datasets' Arrow copy is scratch: the records go to sft/
        try:
            rows = datasets.load_dataset(local, split="train", cache_dir=scratch).to_list()
        except Exception as e:  # an unparsable file, no train split, columns of clashing types
            cause = e
            while cause.__cause__ is not None:  # DatasetGenerationError says only that generating failed
                cause = cause.__cause__
            raise ValueError(f"sft.source={spec}: datasets cannot read {repo_id}@{sha[:12]} as a train split: "
                             f"{type(cause).__name__}: {cause}") from None
    log.info("sft-data: %d rows of %s@%s", len(rows), repo_id, sha[:12])
    # datasets fills a column a row lacks with None; None means absent, as a missing key in a local file does
    return alpaca_records(({k: v for k, v in row.items() if v is not None} for row in rows), counts)


def token_lengths(records: list[dict], tokenizer) -> list[int]:
    """Tokens of each record's training text (prompt + output + EOS), as encode_record counts them."""
    tokenizer.encode_special_tokens = True  # as encode_record: special strings in the text stay text
    # one batched call per field: the tokenizer's own threads instead of a Python loop over records
    prompts = tokenizer.encode_batch([format_prompt(r) for r in records], add_special_tokens=False)
    outputs = tokenizer.encode_batch([r["output"] for r in records], add_special_tokens=False)
    return [len(p.ids) + len(o.ids) + 1 for p, o in zip(prompts, outputs)]


def _build(cfg: Config, tmp: Path) -> dict[str, Any]:
    """Write the three splits, the report and the length histogram."""
    from ..tokenizer import load_tokenizer

    counts: Counter = Counter()
    splits = build_splits(cfg, counts)
    if not splits["train"]:
        raise ValueError(f"sft-data: no training records from sft.source={cfg.sft.source!r} ({dict(counts)})")
    tokenizer = load_tokenizer(cfg.paths.resolve("tokenizer"))
    lengths = {split: token_lengths(records, tokenizer) for split, records in splits.items()}
    if cfg.sft.max_record_tokens > 0:  # before the report: what it describes is what was written
        for split in splits:
            kept = [i for i, n in enumerate(lengths[split]) if n <= cfg.sft.max_record_tokens]
            counts["longer_than_max_record_tokens"] += len(splits[split]) - len(kept)
            splits[split] = [splits[split][i] for i in kept]
            lengths[split] = [lengths[split][i] for i in kept]
    if cfg.sft.max_records > 0:
        for split in splits:
            splits[split], lengths[split] = splits[split][:cfg.sft.max_records], lengths[split][:cfg.sft.max_records]
    if not splits["train"]:
        raise ValueError(f"sft-data: no training record is at most sft.max_record_tokens="
                         f"{cfg.sft.max_record_tokens} tokens long")
    report: dict[str, Any] = {"source": cfg.sft.source, "order": record_order(cfg),
                              "filters": dict(sorted(counts.items())), "splits": {}}
    for split, records in splits.items():
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        over = sum(n > cfg.sft.allowed_max_length for n in lengths[split])
        report["splits"][split] = {"records": len(records), "max_tokens": max(lengths[split], default=0),
                                   "mean_tokens": round(sum(lengths[split]) / max(1, len(records)), 1),
                                   "over_max_length": over,
                                   "share_over_max_length": round(over / max(1, len(records)), 4)}
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_lengths(lengths, cfg.sft.allowed_max_length, tmp / "lengths.png")
    log.info("sft-data: %s (%s)", ", ".join(f"{k} {v['records']}" for k, v in report["splits"].items()),
             report["order"])
    dropped = {k: v for k, v in report["filters"].items() if k != "functions_kept"}
    if dropped:  # the summary prints them too: Stage.run's counts are what the console shows of a stage
        log.info("sft-data: left out %d (%s)", sum(dropped.values()), ", ".join(f"{k} {v}" for k, v in dropped.items()))
    return {**{f"{k}_records": v["records"] for k, v in report["splits"].items()}, "order": report["order"],
            "dropped": dropped}


def length_range(every: list[int], max_length: int) -> tuple[int, str]:
    """The histogram's top (the 99th percentile, at least allowed_max_length + 10% so its line shows) and what the
    axis label truly says of it."""
    every = sorted(every)
    longest = every[-1] if every else 0
    p99 = every[int(0.99 * (len(every) - 1))] if every else 0
    top = max(p99, int(max_length * 1.1), 1)  # a long tail would squeeze the rest into a few bins
    hidden = sum(n > top for n in every)
    if not hidden:
        return top, f"longest {longest}"
    why = "the 99th percentile" if top == p99 else f"allowed_max_length {max_length} + 10%"
    return top, f"{hidden} longer than {top} ({why}) not shown, longest {longest}"


def lengths_figure(lengths: dict[str, list[int]], max_length: int):
    """Histogram of token lengths per split, with the max length marked."""
    from matplotlib.figure import Figure

    top, shown = length_range([n for values in lengths.values() for n in values], max_length)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for split, values in lengths.items():
        if values:
            ax.hist(values, bins=50, range=(0, top), alpha=0.5, label=f"{split} ({len(values)})")
    ax.axvline(max_length, color="black", linestyle="--", label=f"allowed_max_length {max_length}")
    ax.set(xlabel=f"tokens (prompt + response + EOS); {shown}", ylabel="records", title="SFT record lengths")
    ax.legend()
    return fig


def plot_lengths(lengths: dict[str, list[int]], max_length: int, path: Path) -> None:
    """Write `lengths.png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(lengths_figure(lengths, max_length)).print_png(str(path))


def _extra_inputs(cfg: Config) -> dict[str, str]:
    """A user file's hash or a Hub dataset's commit sha (its content is an input: a new commit re-runs the stage)."""
    if cfg.sft.source == "docstrings":
        return {}
    if cfg.sft.source.startswith(HUB_PREFIX):
        require_datasets(cfg.sft.source)  # before any Hub call: a missing library is the first thing to fix
        return {"source": resolve_hub_dataset(cfg.sft.source, cfg.hub)[1]}
    path = Path(cfg.sft.source)
    if not path.is_file():
        raise FileNotFoundError(f"sft.source={path}: no such file (give 'docstrings', an Alpaca .json/.jsonl or "
                                "hub:<repo_id>[@revision])")
    return {"source": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


DATA_KEYS = ("sft.source", "sft.min_docstring_chars", "sft.min_body_lines", "sft.valid_share_of_held_out",
             "sft.train_fraction", "sft.test_fraction", "sft.shuffle_records", "sft.max_records", "sft.max_files",
             "sft.allowed_max_length", "sft.max_record_tokens")
# train.seed: the seed of sft.shuffle_records' order (a new seed re-runs the stage, even where it does not shuffle)
SFT_DATA = Stage(name="sft-data", output="sft", keys=(*DATA_KEYS, "train.seed", "tokenizer.eos_token",
                                                      "corpus.max_bad_ratio"),
                 inputs=("clean", "tokenizer"), extra_inputs=_extra_inputs, build=_build,
                 needs=lambda cfg: ("clean", "tokenizer") if cfg.sft.source == "docstrings" else ("tokenizer",),
                 help="instruction records for fine-tuning: docstring pairs from clean/, an Alpaca file or a "
                      "hub: dataset")
