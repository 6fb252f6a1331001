"""Logging set-up and progress reporting: a tqdm bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("codeparrot")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# One INFO line per Hub HTTP request (httpx2 is huggingface_hub's client): shown only under --log-level DEBUG.
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "huggingface_hub")
# accelerate's save_state drops the LM head from model.safetensors because it shares the token embedding's storage
# (GPT-2's tied head), and warns at every checkpoint; loading ties it again, so for that tensor alone it is noise.
TIED_HEAD_WARNING = re.compile(r"Removed shared tensor \{'(?:[\w.]*\.)?lm_head\.weight'\} while saving")
ACCELERATE_SAVE_LOGGER = "accelerate.utils.other"


def setup_logging(level: str | int = "INFO", rank: int | None = None) -> None:
    """One line per event; ranks other than 0 log warnings only; Hub HTTP requests only under DEBUG."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=level if rank == 0 else "WARNING", format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    for noisy in ("datasets", "urllib3", "filelock", "torch.distributed"):
        logging.getLogger(noisy).setLevel("WARNING")
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    for http in HTTP_LOGGERS:
        logging.getLogger(http).setLevel(logging.NOTSET if debug else logging.WARNING)


class _TiedHeadFilter(logging.Filter):
    """Drops accelerate's warning about the tied LM head only (another shared tensor still warns)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not TIED_HEAD_WARNING.search(record.getMessage())


@contextlib.contextmanager
def quiet_tied_head_warning() -> Iterator[None]:
    """Within: accelerate's "Removed shared tensor {'lm_head.weight'}" warning is not logged."""
    logger, quiet = logging.getLogger(ACCELERATE_SAVE_LOGGER), _TiedHeadFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def interactive() -> bool:
    """True when stderr is a terminal (progress bars) rather than a log file or CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class _LogProgress:
    """tqdm's update/close interface, writing a log line at most every `every` seconds."""

    def __init__(self, total: float | None, desc: str, unit: str, every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = 0.0
        self.start = self.last = time.perf_counter()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        of = f"/{self.total:,.0f}" if self.total else ""
        log.info("%s: %s%s %s (%.1f %s/s) %s", self.desc, f"{self.n:,.0f}", of, self.unit, rate, self.unit, self.postfix)

    postfix = ""

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


def progress_bar(total: float | None = None, desc: str = "", unit: str = "it", unit_scale: bool = False):
    """A tqdm bar on a terminal, else an object with the same update() that logs periodically."""
    if interactive():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True)
    return _LogProgress(total, desc, unit)


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar (terminal) or periodic log lines (otherwise)."""
    bar = progress_bar(total, desc, unit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
