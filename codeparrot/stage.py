"""One contract for every stage that writes an artifact: identity, up-to-date check, staged directory, manifest.

A stage declares what shapes its artifact: the config keys it reads (sections or dotted keys; `config.identity`
leaves out RUNTIME_KEYS), the upstream artifacts it reads (their fingerprints), and any other input it computes
(a benchmark file's hash, say). `Stage.run` skips the stage when the artifact's manifest matches that identity, and
otherwise builds the artifact in a staged directory that is swapped in only once it is complete.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .artifacts import DiskFull, disk_full_cause, fingerprint, is_up_to_date, read_manifest, staged_dir, write_manifest
from .config import Config, identity

log = logging.getLogger(__name__)

# The command that writes each artifact, for the message when an input is missing.
PRODUCERS = {"raw": "export-local", "clean": "prepare", "tokenizer": "train-tokenizer", "tokens": "pretokenize",
             "sft": "sft-data"}


@dataclass(frozen=True)
class Stage:
    """A stage that writes the artifact `paths.<output>` from its config `keys` and upstream `inputs`."""

    name: str  # the command, and the manifest's `stage`
    output: str  # paths key of the artifact it writes: "clean", "tokenizer", ...
    keys: tuple[str, ...]  # config sections ("corpus") or keys ("data.seq_length") that shape the artifact
    build: Callable[[Config, Path], dict[str, Any]]  # writes into the staged directory; returns the counts
    inputs: tuple[str, ...] = ()  # paths keys of the upstream artifacts it reads
    needs: Callable[[Config], tuple[str, ...]] | None = None  # the inputs this config reads, when fewer than all
    extra_inputs: Callable[[Config], dict[str, str]] | None = None  # other inputs' identities (file hashes)
    help: str = ""
    save_config: bool = True  # write the whole config.yaml beside the manifest

    def input_fingerprints(self, cfg: Config) -> dict[str, str]:
        """Upstream fingerprints plus the extra inputs: the `inputs` of the manifest."""
        found = {}
        for key in self.needs(cfg) if self.needs else self.inputs:
            if key == "raw" and cfg.paths.raw_url():  # a remote export: its shard names and sizes
                from .corpus.source import remote_fingerprint

                found[key] = remote_fingerprint(cfg.paths.raw_url())
                continue
            path = cfg.paths.resolve(key)
            if not path.exists():
                raise FileNotFoundError(f"{path} not found; run `codeparrot {PRODUCERS.get(key, key)}` first "
                                        f"(or set paths.{key})")
            found[key] = fingerprint(path)
        return {**found, **(self.extra_inputs(cfg) if self.extra_inputs else {})}

    def is_up_to_date(self, cfg: Config) -> bool:
        """True when the artifact on disk was made by this stage from this config and these inputs."""
        return is_up_to_date(cfg.paths.resolve(self.output), self.name, identity(cfg, self.keys),
                             self.input_fingerprints(cfg))

    def run(self, cfg: Config) -> dict[str, Any]:
        """Build the artifact unless it is up to date: {"skipped": bool, **counts}."""
        out = cfg.paths.resolve(self.output)
        config, inputs = identity(cfg, self.keys), self.input_fingerprints(cfg)
        if is_up_to_date(out, self.name, config, inputs):
            log.info("%s: %s is up to date, skipping", self.name, out)
            return {"skipped": True, **read_manifest(out)["counts"]}
        start = time.perf_counter()
        try:
            with staged_dir(out) as tmp:
                counts = self.build(cfg, tmp)
                write_manifest(tmp, self.name, config, inputs, counts, time.perf_counter() - start,
                               full_config=cfg if self.save_config else None)
        except Exception as e:
            full = disk_full_cause(e)
            if full is None:
                raise
            # A write into the staged directory rarely names its file (gzip, numpy): name the artifact instead.
            raise DiskFull(full.errno, full.strerror, str(full.filename or out)) from e
        seconds = time.perf_counter() - start
        log.info("%s: wrote %s in %.1f s", self.name, out, seconds)
        return {"skipped": False, "seconds": round(seconds, 2), **counts}
