"""The `prepare` stage: raw export -> exact-deduplicated, repo-split clean corpus with a report."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..artifacts import fingerprint, is_up_to_date, read_manifest, staged_dir, write_manifest
from ..config import Config, section_dict
from ..logs import progress_bar
from .filters import compute_columns
from .source import BadRecords, ShardWriter, iter_shard, list_shards

log = logging.getLogger(__name__)

STAGE = "prepare"


def is_valid_repo(repo_name: str, valid_fraction: float, seed: int) -> bool:
    """Stable repo-level split: a repository's files all land on the same side, on every machine."""
    digest = hashlib.md5(f"{seed}:{repo_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Clean `paths.raw` into `paths.clean/{train,valid}`; skipped when the manifest already matches."""
    raw, clean = cfg.paths.resolve("raw"), cfg.paths.resolve("clean")
    files = list_shards(raw)
    if not files:
        raise FileNotFoundError(f"no export shards under {raw}; run `codeparrot export-local {raw}` or set paths.raw")
    config = section_dict(cfg, "corpus")
    inputs = {"raw": fingerprint(raw)}
    if is_up_to_date(clean, STAGE, config, inputs):
        log.info("prepare: %s is up to date, skipping", clean)
        return {"skipped": True, **read_manifest(clean)["counts"]}

    c = cfg.corpus
    start = time.perf_counter()
    bad = BadRecords(max_ratio=c.max_bad_ratio)
    seen: set[bytes] = set()  # 16-byte MD5 digests: about 80 bytes per unique file in a Python set
    counts = {"files_in": 0, "bytes_in": 0, "exact_duplicates": 0, "bytes_exact_duplicates": 0,
              "train_files": 0, "train_bytes": 0, "valid_files": 0, "valid_bytes": 0}
    total_bytes = sum(f.stat().st_size for f in files)
    bar = progress_bar(total_bytes, desc="prepare", unit="B", unit_scale=True)
    with staged_dir(clean) as tmp, \
            ShardWriter(tmp / "train", c.output_shard_records) as train_w, \
            ShardWriter(tmp / "valid", c.output_shard_records) as valid_w:
        for shard in files:
            for _, record in iter_shard(shard, bad):
                content = record["content"]
                counts["files_in"] += 1
                counts["bytes_in"] += len(content)
                columns = compute_columns(content)
                digest = bytes.fromhex(columns["hash"])
                if c.exact_dedup and digest in seen:
                    counts["exact_duplicates"] += 1
                    counts["bytes_exact_duplicates"] += len(content)
                    continue
                seen.add(digest)
                # Quality filters and near-deduplication slot in here (issue 4), each counted in `counts`.
                repo = str(record.get("repo_name", ""))
                side = "valid" if is_valid_repo(repo, c.valid_fraction, c.split_seed) else "train"
                (valid_w if side == "valid" else train_w).write({**record, **columns})
                counts[f"{side}_files"] += 1
                counts[f"{side}_bytes"] += len(content)
            bar.update(shard.stat().st_size)
            bar.set_postfix_str(f"{counts['files_in']:,} files")
        bar.close()
        bad.check(final=True)
        if counts["valid_files"] == 0:
            log.warning("prepare: no repository fell in the valid split; raise corpus.valid_fraction")
        seconds = time.perf_counter() - start
        counts.update(bad.as_dict())
        counts["files_out"] = counts["train_files"] + counts["valid_files"]
        counts["mb_per_s"] = round(counts["bytes_in"] / 1e6 / max(seconds, 1e-9), 2)
        (tmp / "report.json").write_text(json.dumps(counts, indent=2) + "\n")
        write_manifest(tmp, STAGE, config, inputs, counts, seconds, full_config=cfg)
    log.info("prepare: %d files in, %d duplicates, %d bad, %d train + %d valid out, %.1f s",
             counts["files_in"], counts["exact_duplicates"], counts["bad"], counts["train_files"],
             counts["valid_files"], seconds)
    return {"skipped": False, **counts, "seconds": round(seconds, 2)}
