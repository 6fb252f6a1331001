"""Bad input: counts of skipped records by kind, and the ratio past which a stage stops (every reader shares it)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("codeparrot.corpus.source")  # the readers' logger, as before the split

LOGGED_BAD_RECORDS = 20  # log this many bad records per stream one line each, then only count


class TooManyBadRecords(RuntimeError):
    """The share of bad records passed `corpus.max_bad_ratio`."""


@dataclass
class BadRecords:
    """Counts of skipped input by kind, with the max-ratio policy."""

    max_ratio: float = 1.0
    min_records: int = 200  # don't judge the ratio on a handful of records
    good: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    logged: int = 0  # events logged so far (an event may count many records: the rows after a break)

    @property
    def total_bad(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, where: str, detail: str = "", count: int = 1) -> None:
        """Count `count` bad records (or an unreadable file) of one event and log the event, once, with file and
        line."""
        self.counts[kind] = self.counts.get(kind, 0) + count
        if self.logged < LOGGED_BAD_RECORDS:
            self.logged += 1
            log.warning("skipped %s%s at %s%s", f"{count} " if count != 1 else "", kind, where,
                        f": {detail}" if detail else "")
            if self.logged == LOGGED_BAD_RECORDS:
                log.warning("further bad records are counted but not logged")
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise when the bad share exceeds the configured ratio."""
        bad = self.total_bad
        seen = bad + self.good
        if seen and (final or seen >= self.min_records) and bad / seen > self.max_ratio:
            raise TooManyBadRecords(
                f"{bad} of {seen} records were bad ({bad / seen:.1%}), more than corpus.max_bad_ratio="
                f"{self.max_ratio}; by kind: {self.counts}. The log names the first files and lines."
            )

    def as_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": self.total_bad, "bad_by_kind": dict(self.counts)}
