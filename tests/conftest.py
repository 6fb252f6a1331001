"""Shared fixtures: a small tree of real standard-library files, its export, and tiny configs.

Everything here is built by the tests from the running interpreter's standard library; nothing is downloaded.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"

import email  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

import pytest  # noqa: E402

from codeparrot.config import Config, load_config  # noqa: E402
from codeparrot.corpus.prepare import is_valid_repo  # noqa: E402
from codeparrot.corpus.source import BadRecords, iter_records, list_shards  # noqa: E402

STDLIB = Path(os.__file__).parent
ROOT_NAME = "pyroot"  # fixed name: repo names are f"{ROOT_NAME}/<top-level package or module>"
N_FILES = 48
SKIP_TOP = {"site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"}
EXPORT_SHARD_RECORDS = 16
VALID_FRACTION = 0.25
# The environment of the codeparrot processes tests start: offline, one thread each, no tokenizer thread pool.
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                  "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for `accelerate launch --main_process_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str) -> None:
    """Run a codeparrot command in this process (the console script's entry point) and assert it succeeded."""
    from codeparrot.cli import main

    assert main(list(args)) == 0, args


def build_training_corpus(root: Path, overrides: list[str], pretokenize: bool) -> Path:
    """Export the stdlib packages email and json under `root`, then prepare, train a tokenizer (and pretokenize)."""
    run_cli("export-local", str(root / "raw"), "--root", str(Path(email.__file__).parent),
            "--root", str(Path(json.__file__).parent), "--shard-records", "10")
    for stage in ("prepare", "train-tokenizer", *(("pretokenize",) if pretokenize else ())):
        run_cli(stage, f"paths.workdir={root}", *overrides)
    return root


def stdlib_sample(n: int = N_FILES, min_size: int = 1500, max_size: int = 16000) -> list[str]:
    """A deterministic spread of small-to-medium UTF-8 stdlib files, as paths relative to the stdlib."""
    candidates = []
    for p in STDLIB.rglob("*.py"):
        rel = p.relative_to(STDLIB)
        if rel.parts[0] in SKIP_TOP or "test" in rel.parts or "tests" in rel.parts or not p.is_file():
            continue
        if not min_size <= p.stat().st_size <= max_size:
            continue
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        candidates.append(rel.as_posix())
    candidates.sort()
    assert len(candidates) >= n, f"only {len(candidates)} candidate stdlib files"
    step = len(candidates) // n
    return candidates[::step][:n]


def top_of(rel: str) -> str:
    """The repo-level name export-local gives a file: its top-level package, or the module's stem."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def read_all(spec: Any, bad: BadRecords | None = None) -> list[dict[str, Any]]:
    """Every good record of the shards at `spec` (a directory, glob, file or list)."""
    return list(iter_records(list_shards(spec), bad if bad is not None else BadRecords()))


def read_tokens(directory: Path, split: str) -> "np.ndarray":  # noqa: F821 (numpy imported inside)
    """All token ids of a pretokenized split, its files concatenated in meta.json's order (loads it all)."""
    import numpy as np

    from codeparrot.data.pretokenize import load_meta

    meta = load_meta(directory)
    parts = [np.fromfile(Path(directory) / f["path"], dtype=meta["dtype"]) for f in meta["splits"][split]["files"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def write_jsonl(path: Path, lines: Iterable[bytes | str | dict], gz: bool | None = None) -> Path:
    """Write raw lines (bytes/str written as-is, dicts as JSON) to a shard, gzipped when the name says so."""
    gz = path.name.endswith(".gz") if gz is None else gz
    data = b"".join(
        (json.dumps(x).encode() if isinstance(x, dict) else x.encode() if isinstance(x, str) else x) + b"\n"
        for x in lines
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_parquet(path: Path, records: list[dict], schema: Any = None, row_group_size: int | None = None) -> Path:
    """Records as a Parquet shard (pyarrow infers the schema unless given one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path, row_group_size=row_group_size)
    return path


def write_avro(path: Path, records: list[dict], fields: list[dict] | None = None) -> Path:
    """Records as an Avro shard; `fields` default to nullable strings named as the first record's keys."""
    import fastavro

    fields = fields or [{"name": k, "type": ["null", "string"]} for k in records[0]]
    schema = fastavro.parse_schema({"type": "record", "name": "row", "fields": fields})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fastavro.writer(fh, schema, records, codec="deflate", sync_interval=4000)
    return path


def split_seed_for(repos: Iterable[str], fraction: float) -> int:
    """The first split seed that puts at least one of `repos` on each side (so both splits are non-empty)."""
    repos = sorted(set(repos))
    for seed in range(1, 1000):
        sides = {is_valid_repo(r, fraction, seed) for r in repos}
        if sides == {True, False}:
            return seed
    raise AssertionError("no split seed gives both splits")


@pytest.fixture(scope="session")
def stdlib_files() -> list[str]:
    return stdlib_sample()


@pytest.fixture(scope="session")
def stdlib_root(tmp_path_factory, stdlib_files) -> Path:
    """A package-shaped tree of real stdlib files (`pyroot/json/...`, `pyroot/bisect.py`, ...)."""
    root = tmp_path_factory.mktemp("stdlib") / ROOT_NAME
    for rel in stdlib_files:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STDLIB / rel, dest)
    return root


@pytest.fixture(scope="session")
def raw_export(tmp_path_factory, stdlib_root) -> tuple[Path, dict[str, Any]]:
    """`run_export_local` of the stdlib tree: (raw directory, the stage's result)."""
    from codeparrot.pipeline import run_export_local

    raw = tmp_path_factory.mktemp("export") / "raw"
    result = run_export_local(raw, [str(stdlib_root)], shard_records=EXPORT_SHARD_RECORDS)
    return raw, result


@pytest.fixture(scope="session")
def split_seed(stdlib_files) -> int:
    return split_seed_for((f"{ROOT_NAME}/{top_of(rel)}" for rel in stdlib_files), VALID_FRACTION)


@pytest.fixture(scope="session")
def make_config(split_seed) -> Callable[..., Config]:
    """make_config(workdir, *overrides): a small, fast Config with its artifacts under `workdir`."""

    def make(workdir: str | Path, *overrides: str) -> Config:
        return load_config(None, [
            f"paths.workdir={workdir}",
            "tokenizer.vocab_size=600",
            "tokenizer.n_examples=200",
            "tokenizer.report_valid_files=50",
            f"corpus.valid_fraction={VALID_FRACTION}",
            f"corpus.split_seed={split_seed}",
            f"corpus.export_shard_records={EXPORT_SHARD_RECORDS}",
            "corpus.output_shard_records=16",
            *overrides,
        ])

    return make


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, raw_export, make_config) -> tuple[Config, dict[str, Any]]:
    """`run_prepare` on the fixture export (paths.raw points at it): (config, the stage's result)."""
    from codeparrot.corpus.prepare import run_prepare

    workdir = tmp_path_factory.mktemp("work")
    cfg = make_config(workdir, f"paths.raw={raw_export[0]}")
    return cfg, run_prepare(cfg)


@pytest.fixture(scope="session")
def trained_tokenizer(prepared) -> tuple[Config, dict[str, Any]]:
    """`run_train_tokenizer` on the prepared fixture: (config, the stage's result)."""
    from codeparrot.tokenizer import run_train_tokenizer

    cfg, _ = prepared
    return cfg, run_train_tokenizer(cfg)


def summaries(stdout: str) -> dict[str, dict[str, str]]:
    """The CLI's `== stage ==` blocks of `key: value` lines."""
    import re

    out: dict[str, dict[str, str]] = {}
    current = None
    for line in stdout.splitlines():
        if m := re.fullmatch(r"== (.+) ==", line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := re.fullmatch(r"  (\w+): (.*)", line)):
            current[m.group(1)] = m.group(2)
    return out


def first_batches(loader: Iterable, n: int) -> list:
    """The first `n` batches of a loader (a fresh iteration)."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def train_cli(workdir: Path, overrides: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`codeparrot train` with `overrides` (two CPU processes when `launcher` is an accelerate launch); must pass."""
    cmd = (launcher or [sys.executable, "-m"]) + ["codeparrot", "train", f"paths.workdir={workdir}", *overrides]
    env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"} if launcher else SUBPROCESS_ENV
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_losses(run: Path) -> dict[int, float]:
    """step -> logged train loss of a run (its logs/metrics.jsonl)."""
    lines = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}

