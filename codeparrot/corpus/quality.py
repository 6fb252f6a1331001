"""Quality buckets: a (noisy) quality signal per kept file, which training can feed to the model as a token.

The names are a contract: `prepare` writes one of them in each clean record's `quality` field, the tokenizer
reserves one special token per bucket (`<quality_low>` ...), and `generate --quality high` asks for one.

`corpus.quality_signal` picks the signal (the scan computes it once per kept file; the write reuses it):
- `copies`: BigQuery's `copies`, the number of repositories holding the file (the chapter's "used in other
  projects"). With `quality_copies_thresholds: [m, h]`, a file with at least h copies is high, at least m medium,
  fewer low. A missing, non-numeric or non-positive `copies` is low, and counted as `copies_unknown` in the report.
- `stars`: The Stack's `max_stars_count` (mapped to our `stars` field by corpus.layout=the-stack), the stars of the
  most-starred repository holding the file. With `quality_stars_thresholds: [m, h]`, at least h stars is high, at
  least m medium, fewer low. A null (no starred repository), negative or non-numeric value is low, and counted as
  unknown, as a missing `copies` is.
- `heuristics`: the signals behind CodeParrot's probabilistic filters, scored on the files those filters kept. The
  score is how many of `quality_heuristics_signals` the file shows: `config_or_test` (filters.is_config_or_test),
  `no_keywords` (filters.has_no_keywords) and `few_assignments` (at most `quality_few_assignments` "=" characters).
  With `quality_heuristics_thresholds: [m, h]`, a score of at most h is high, at most m medium, more low; the
  default [1, 0] makes a file showing no signal high, one medium, two or more low.
- `none`: no bucket, no `quality` field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .filters import Signals

QUALITY_BUCKETS = ("low", "medium", "high")  # worst first: a bucket's index orders it
UNKNOWN_QUALITY = 255  # a document's bucket index when its record has no (valid) `quality` field
QUALITY_SIGNALS = ("copies", "stars", "heuristics", "none")
HEURISTIC_SIGNALS = ("config_or_test", "no_keywords", "few_assignments")
LOW, MEDIUM, HIGH = range(len(QUALITY_BUCKETS))


def parse_copies(value: Any) -> int | None:
    """BigQuery's `copies` (a decimal string in the export, or a JSON integer) as a positive int; None when it is
    missing or not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        copies = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        copies = int(value)
    else:
        return None
    return copies if copies >= 1 else None


def parse_stars(value: Any) -> int | None:
    """A star count (an int, a whole float as pandas-made Parquet holds a nullable int64, or a decimal string) as an
    int >= 0; None when it is null or not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():  # NaN and infinities are not
        value = int(value)
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return None


def copies_bucket(copies: int | None, thresholds: Sequence[int]) -> int:
    """The bucket index of a file held by `copies` repositories (or with `copies` stars): [least for medium, least
    for high]; None is low."""
    medium, high = thresholds
    if copies is None or copies < medium:
        return LOW
    return HIGH if copies >= high else MEDIUM


def shown_signals(signals: Signals, names: Sequence[str], few_assignments: int) -> int:
    """How many of the heuristic signals `names` the file shows (its heuristics score: lower is better)."""
    shown = {"config_or_test": lambda: signals.config_or_test, "no_keywords": lambda: signals.no_keywords,
             "few_assignments": lambda: signals.assignments <= few_assignments}
    return sum(bool(shown[name]()) for name in names)


def heuristics_bucket(score: int, thresholds: Sequence[int]) -> int:
    """The bucket index of a heuristics score: [most signals for medium, most for high]."""
    medium, high = thresholds
    return HIGH if score <= high else MEDIUM if score <= medium else LOW


def _pair(corpus: Any, key: str, minimum: int, ascending: bool, meaning: str) -> tuple[int, int]:
    """A two-int threshold key of the corpus config, checked; ConfigError names the key and its meaning."""
    from ..config import ConfigError

    value = list(getattr(corpus, key))
    order = "medium <= high" if ascending else "medium >= high"
    if (len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)
            or (value[0] > value[1] if ascending else value[0] < value[1])):
        raise ConfigError(f"corpus.{key}: expected two integers >= {minimum} with {order} ({meaning}), got {value}")
    return value[0], value[1]


@dataclass(frozen=True)
class QualityRule:
    """How `prepare` buckets a kept file, from the corpus config (`from_config` checks it)."""

    signal: str
    copies_thresholds: tuple[int, int]
    stars_thresholds: tuple[int, int]
    heuristics_signals: tuple[str, ...]
    heuristics_thresholds: tuple[int, int]
    few_assignments: int

    @classmethod
    def from_config(cls, corpus: Any) -> QualityRule:
        """From a CorpusConfig; ConfigError for a value that no run could use."""
        from ..config import ConfigError

        if corpus.quality_signal not in QUALITY_SIGNALS:
            raise ConfigError(f"corpus.quality_signal: {corpus.quality_signal!r} is not one of "
                              f"{', '.join(QUALITY_SIGNALS)}")
        names = tuple(corpus.quality_heuristics_signals)
        unknown = [n for n in names if n not in HEURISTIC_SIGNALS]
        if unknown or len(set(names)) != len(names):
            raise ConfigError(f"corpus.quality_heuristics_signals: unknown or repeated signal(s) in {list(names)}; "
                              f"valid signals: {', '.join(HEURISTIC_SIGNALS)}")
        if not names and corpus.quality_signal == "heuristics":
            raise ConfigError("corpus.quality_heuristics_signals is empty, so every file would be high; name at "
                              "least one signal, or set corpus.quality_signal=none for no buckets")
        if isinstance(corpus.quality_few_assignments, bool) or corpus.quality_few_assignments < 0:
            raise ConfigError(f"corpus.quality_few_assignments: expected an integer >= 0, got "
                              f"{corpus.quality_few_assignments!r}")
        return cls(signal=corpus.quality_signal,
                   copies_thresholds=_pair(corpus, "quality_copies_thresholds", 1, True,
                                           "the least copies for medium and for high"),
                   stars_thresholds=_pair(corpus, "quality_stars_thresholds", 0, True,
                                          "the least stars for medium and for high"),
                   heuristics_signals=names,
                   heuristics_thresholds=_pair(corpus, "quality_heuristics_thresholds", 0, False,
                                               "the most signals shown by a medium and by a high file"),
                   few_assignments=corpus.quality_few_assignments)

    @property
    def enabled(self) -> bool:
        return self.signal != "none"

    def grade(self, record: dict[str, Any], signals: Signals) -> tuple[int, bool]:
        """A kept file's bucket index, and whether its signal's value was valid (False: unknown copies or stars)."""
        if self.signal == "copies":
            copies = parse_copies(record.get("copies"))
            return copies_bucket(copies, self.copies_thresholds), copies is not None
        if self.signal == "stars":  # the same rule as copies': at least m for medium, at least h for high
            stars = parse_stars(record.get("stars"))
            return copies_bucket(stars, self.stars_thresholds), stars is not None
        if self.signal == "heuristics":
            score = shown_signals(signals, self.heuristics_signals, self.few_assignments)
            return heuristics_bucket(score, self.heuristics_thresholds), True
        raise ValueError("corpus.quality_signal=none grades nothing")
