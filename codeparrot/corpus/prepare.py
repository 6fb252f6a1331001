"""The `prepare` stage: raw export -> filtered, deduplicated (exact + near), decontaminated, repo-split corpus.

Three phases; only phase 2 holds state that grows with the corpus:
1. scan (parallel, one task per input shard): read the shard, compute the columns, apply the quality filters and
   the decontamination search, and MinHash the files that survive them. A task returns compact per-record
   metadata (line, hash, size, verdict, signature), never contents.
2. dedup (main process, shards in input order as their scans arrive): exact dedup over the hashes, first occurrence
   wins; then MinHash-LSH clustering of the surviving files, keeping the first file of each cluster.
   Memory: about 100 bytes per distinct hash (a Python set of 16-byte digests) plus the survivors' uint32
   signatures, survivors x minhash_num_perm x 4 bytes (twice that while the per-shard blocks are concatenated),
   plus, while clustering, dedup's band keys, LSH index and union-find: ~4 KB per survivor measured at 256
   permutations, so ~5 GB per million survivors in all.
3. write (parallel, one task per input shard): re-read the shard and write its kept records to train/ or valid/
   as `file-<input shard index:012d>-<k:06d>.json.gz`; each task owns its output files, so the names and bytes
   do not depend on the number of processes.
Everything is written into `clean.tmp/` and swapped in at the end (`staged_dir`): an interrupted run leaves no
partial `clean/`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..artifacts import fingerprint, is_up_to_date, read_manifest, staged_dir, write_manifest
from ..config import Config, ConfigError, section_dict
from ..logs import progress_bar
from .decontaminate import Decontaminator
from .filters import FILTERS, FilterSettings, QualityFilter, compute_columns, strip_whitespace
from .source import LOGGED_BAD_RECORDS, BadRecords, ShardWriter, iter_shard, list_shards

log = logging.getLogger(__name__)

STAGE = "prepare"
CLUSTERS_FILE = "near_duplicate_clusters.jsonl"
LENGTHS_PLOT = "file_lengths.png"
KEEP, DUP_IN_SHARD, DECONTAMINATED, FILTERED = 0, 1, 2, 10  # scan verdicts; FILTERED + FILTERS.index(name)
LENGTH_BINS = np.logspace(0, 8, 65)  # file length in characters, 1 to 1e8, 8 bins per decade
SIGNATURE_BATCH_CHARS = 8_000_000  # text MinHashed together in a scan task (bounds a task's memory on huge shards)
NOT_IDENTITY = ("num_proc",)  # corpus keys that change how prepare runs, not what it writes


def is_valid_repo(repo_name: str, valid_fraction: float, seed: int) -> bool:
    """Stable repo-level split: a repository's files all land on the same side, on every machine."""
    digest = hashlib.md5(f"{seed}:{repo_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction


@dataclass
class _QuietBad(BadRecords):
    """BadRecords for a worker: counts, never raises, keeps the first samples for the main process to log."""

    samples: list = field(default_factory=list)

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.samples) < LOGGED_BAD_RECORDS:
            self.samples.append((kind, where, detail))


@dataclass
class _Settings:
    """What a worker process needs; pickled once per worker."""

    filters: FilterSettings
    filter_tokenizer: str
    decontam: Decontaminator | None
    exact_dedup: bool
    near_dedup: bool
    num_perm: int
    ngram: int
    seed: int
    valid_fraction: float
    split_seed: int
    shard_records: int


_worker: dict[str, Any] = {}  # per-process state built by _init_worker


def _init_worker(settings: _Settings) -> None:
    tokenizer = None
    if "chars_per_token" in settings.filters.enabled:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(settings.filter_tokenizer)
    hasher = None
    if settings.near_dedup:
        from .dedup import MinHasher

        hasher = MinHasher(num_perm=settings.num_perm, ngram=settings.ngram, seed=settings.seed)
    _worker.clear()
    _worker.update(settings=settings, quality=QualityFilter(settings.filters, tokenizer), hasher=hasher)


def _length_hist(sizes: Iterable[int]) -> np.ndarray:
    values = np.clip(np.fromiter(sizes, dtype=np.float64), 1, LENGTH_BINS[-1] * 0.999)
    return np.histogram(values, bins=LENGTH_BINS)[0].astype(np.int64)


@dataclass
class _Scan:
    """Phase 1 result for one shard: per good record, in file order."""

    index: int
    lines: list[int]
    digests: list[bytes]
    sizes: list[int]
    verdicts: list[int]
    signatures: np.ndarray | None  # one row per KEEP verdict, in order
    decontaminated: dict[int, list[dict[str, str]]]  # line -> matched needles
    meta: dict[int, dict[str, str]]  # line -> repo_name/path of decontaminated records
    good: int
    bad_counts: dict[str, int]
    bad_samples: list[tuple[str, str, str]]
    hist: np.ndarray
    seconds: float


def _scan_shard(task: tuple[int, str]) -> _Scan:
    index, path = task
    start = time.perf_counter()
    s: _Settings = _worker["settings"]
    quality: QualityFilter = _worker["quality"]
    hasher = _worker["hasher"]
    bad = _QuietBad()
    lines, digests, sizes, verdicts = [], [], [], []
    batch: list[str] = []
    batch_chars = 0
    blocks: list[np.ndarray] = []
    decontaminated: dict[int, list[dict[str, str]]] = {}
    meta: dict[int, dict[str, str]] = {}
    seen_here: set[bytes] = set()
    for line, record in iter_shard(path, bad):
        content = record["content"]
        stripped = strip_whitespace(content)
        try:  # JSON can escape lone surrogates ("\ud800"), which no UTF-8 writer accepts
            columns = compute_columns(content, stripped)
            json.dumps({k: v for k, v in record.items() if k != "content"}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad.good -= 1
            bad.add("invalid_utf8", f"{path}:{line + 1}", str(e)[:80])
            continue
        digest = bytes.fromhex(columns["hash"])
        lines.append(line)
        digests.append(digest)
        sizes.append(len(content))
        if s.exact_dedup:
            if digest in seen_here:  # a later copy in the same shard: an exact duplicate, whatever came before
                verdicts.append(DUP_IN_SHARD)
                continue
            seen_here.add(digest)
        reason = quality.reason(content, columns)
        if reason is not None:
            verdicts.append(FILTERED + FILTERS.index(reason))
            continue
        if s.decontam:
            found = s.decontam.find(content, stripped)
            if found:
                verdicts.append(DECONTAMINATED)
                decontaminated[line] = [{"benchmark": n.benchmark, "task_id": n.task_id, "field": n.field}
                                        for n in found]
                meta[line] = {"repo_name": str(record.get("repo_name", "")), "path": str(record.get("path", ""))}
                continue
        verdicts.append(KEEP)
        if hasher is not None:
            batch.append(content)
            batch_chars += len(content)
            if batch_chars >= SIGNATURE_BATCH_CHARS:
                blocks.append(hasher.signatures(batch))
                batch, batch_chars = [], 0
    signatures = None
    if hasher is not None:
        if batch:
            blocks.append(hasher.signatures(batch))
        signatures = np.concatenate(blocks) if blocks else np.zeros((0, s.num_perm), dtype=np.uint32)
    return _Scan(index, lines, digests, sizes, verdicts, signatures, decontaminated, meta, bad.good,
                 dict(bad.counts), bad.samples, _length_hist(sizes), time.perf_counter() - start)


def _write_shard(task: tuple[int, str, np.ndarray, frozenset[int], str]) -> dict[str, Any]:
    index, path, keep_lines, members, out = task
    s: _Settings = _worker["settings"]
    keep = set(keep_lines.tolist())
    writers: dict[str, ShardWriter] = {}
    counts = {"train_files": 0, "train_bytes": 0, "valid_files": 0, "valid_bytes": 0}
    sizes: list[int] = []
    meta: dict[int, dict[str, str]] = {}
    for line, record in iter_shard(path, _QuietBad()):
        if line in members:
            meta[line] = {"repo_name": str(record.get("repo_name", "")), "path": str(record.get("path", ""))}
        if line not in keep:
            continue
        content = record["content"]
        side = "valid" if is_valid_repo(str(record.get("repo_name", "")), s.valid_fraction, s.split_seed) else "train"
        if side not in writers:
            # ShardWriter numbers its files from 0 in its own directory; renamed below to carry the input shard.
            writers[side] = ShardWriter(Path(out) / side / f".part-{index:012d}", s.shard_records)
        writers[side].write({**record, **compute_columns(content)})
        counts[f"{side}_files"] += 1
        counts[f"{side}_bytes"] += len(content)
        sizes.append(len(content))
    for side, writer in writers.items():
        writer.close()
        for k, part in enumerate(sorted(writer.directory.iterdir())):
            part.rename(writer.directory.parent / f"file-{index:012d}-{k:06d}.json.gz")
        writer.directory.rmdir()
    written = counts["train_files"] + counts["valid_files"]
    return {"index": index, **counts, "missing": len(keep) - written, "meta": meta, "hist": _length_hist(sizes)}


class _Runner:
    """Runs per-shard tasks in input order: in this process (num_proc 1) or in a pool of spawned workers."""

    def __init__(self, settings: _Settings, num_proc: int):
        self.pool: ProcessPoolExecutor | None = None
        if num_proc > 1:
            # spawn, not fork: the parent may hold threads (torch, tokenizers) that a forked child would inherit.
            # An executor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool instead of hanging.
            self.pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(settings,))
        else:
            _init_worker(settings)

    def map(self, fn: Callable, tasks: Iterable) -> Iterator:
        if self.pool is None:
            return map(fn, tasks)
        return self.pool.map(fn, tasks)

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool = None


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _settings(cfg: Config) -> tuple[_Settings, dict[str, str]]:
    """Worker settings from the corpus config, plus the identities of the extra inputs (tokenizer, benchmarks)."""
    c = cfg.corpus
    extra_inputs: dict[str, str] = {}
    with_tokenizer = bool(c.filter_tokenizer)
    if with_tokenizer and "chars_per_token" in c.filters:
        if not Path(c.filter_tokenizer).is_file():
            raise FileNotFoundError(f"corpus.filter_tokenizer={c.filter_tokenizer} does not exist")
        extra_inputs["filter_tokenizer"] = _sha256(c.filter_tokenizer)
    elif "chars_per_token" in c.filters:
        log.debug("prepare: the chars_per_token filter is off (corpus.filter_tokenizer is not set)")
    filters = FilterSettings.from_config(c, with_tokenizer)
    if not 0 < c.minhash_threshold <= 1 or c.minhash_num_perm < 2 or c.minhash_ngram < 1:
        raise ConfigError("corpus.minhash_threshold must be in (0, 1], corpus.minhash_num_perm >= 2 and "
                          f"corpus.minhash_ngram >= 1; got {c.minhash_threshold}, {c.minhash_num_perm}, "
                          f"{c.minhash_ngram}")
    decontam = None
    if c.decontaminate:
        decontam = Decontaminator.from_specs(c.decontaminate, c.decontaminate_min_chars)
        extra_inputs["decontaminate"] = ",".join(f"{k}:{v}" for k, v in sorted(decontam.sources.items()))
    settings = _Settings(filters=filters, filter_tokenizer=c.filter_tokenizer, decontam=decontam,
                         exact_dedup=c.exact_dedup, near_dedup=c.near_dedup, num_perm=c.minhash_num_perm,
                         ngram=c.minhash_ngram, seed=c.minhash_seed, valid_fraction=c.valid_fraction,
                         split_seed=c.split_seed, shard_records=c.output_shard_records)
    return settings, extra_inputs


def _mb_per_s(n_bytes: int, seconds: float) -> float:
    return round(n_bytes / 1e6 / max(seconds, 1e-9), 2)


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Clean `paths.raw` into `paths.clean/{train,valid}`; skipped when the manifest already matches."""
    raw, clean = cfg.paths.resolve("raw"), cfg.paths.resolve("clean")
    files = list_shards(raw)
    if not files:
        raise FileNotFoundError(f"no export shards under {raw}; run `codeparrot export-local {raw}` or set paths.raw")
    config = section_dict(cfg, "corpus")
    for key in NOT_IDENTITY:
        config["corpus"].pop(key, None)
    settings, extra_inputs = _settings(cfg)
    inputs = {"raw": fingerprint(raw), **extra_inputs}
    if is_up_to_date(clean, STAGE, config, inputs):
        log.info("prepare: %s is up to date, skipping", clean)
        return {"skipped": True, **read_manifest(clean)["counts"]}

    c = cfg.corpus
    num_proc = min(c.num_proc if c.num_proc > 0 else (os.cpu_count() or 1), len(files))
    start = time.perf_counter()
    runner = _Runner(settings, num_proc)
    try:
        with staged_dir(clean) as tmp:
            counts, report = _prepare(cfg, settings, files, runner, tmp)
            runner.close()
            counts["seconds"] = round(time.perf_counter() - start, 2)
            counts["mb_per_s"] = _mb_per_s(counts["bytes_in"], counts["seconds"])
            counts["num_proc"] = num_proc
            counts["peak_rss_mb"] = _peak_rss_mb()
            report = {**counts, **report}
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            _plot_lengths(report["length_histogram"], tmp / LENGTHS_PLOT)
            write_manifest(tmp, STAGE, config, inputs, counts, counts["seconds"], full_config=cfg)
    finally:
        runner.close(cancel=True)
    log.info("prepare: wrote %s\n%s", clean, format_report(counts))
    return {"skipped": False, **counts}


def _prepare(cfg: Config, settings: _Settings, files: list[Path], runner: _Runner, tmp: Path
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Phases 1-3 into the staging directory `tmp`: (counts for the manifest, extra report fields)."""
    c = cfg.corpus
    bad = BadRecords(max_ratio=c.max_bad_ratio)
    logged_bad = 0
    filtered = {name: 0 for name in settings.filters.enabled}
    bytes_filtered = {name: 0 for name in settings.filters.enabled}
    counts: dict[str, Any] = {"files_in": 0, "bytes_in": 0, "exact_duplicates": 0, "bytes_exact_duplicates": 0}
    n_decontam = bytes_decontam = 0
    decontaminated: list[dict[str, Any]] = []
    hist_in = np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)
    seen: set[bytes] = set()  # 16-byte MD5 digests: about 100 bytes per distinct file in a Python set
    surv_shard: list[np.ndarray] = []  # per scanned shard: the surviving records' shard index, line, size
    surv_line: list[np.ndarray] = []
    surv_size: list[np.ndarray] = []
    sig_blocks: list[np.ndarray] = []

    # Phase 1 (workers) + exact dedup and bookkeeping (here), shard by shard in input order.
    t0 = time.perf_counter()
    bar = progress_bar(sum(f.stat().st_size for f in files), desc="prepare: scan", unit="B", unit_scale=True)
    for scan in runner.map(_scan_shard, [(i, str(f)) for i, f in enumerate(files)]):
        bad.good += scan.good
        for kind, n in scan.bad_counts.items():
            bad.counts[kind] = bad.counts.get(kind, 0) + n
        for kind, where, detail in scan.bad_samples:
            if logged_bad < LOGGED_BAD_RECORDS:
                log.warning("skipped %s at %s%s", kind, where, f": {detail}" if detail else "")
                logged_bad += 1
                if logged_bad == LOGGED_BAD_RECORDS:
                    log.warning("further bad records are counted but not logged")
        bad.check()
        hist_in += scan.hist
        keep_rows, sig_rows = [], []
        candidate = -1
        for i, (line, digest, size, verdict) in enumerate(zip(scan.lines, scan.digests, scan.sizes, scan.verdicts)):
            counts["files_in"] += 1
            counts["bytes_in"] += size
            if verdict == KEEP:
                candidate += 1
            if verdict == DUP_IN_SHARD or (c.exact_dedup and digest in seen):
                counts["exact_duplicates"] += 1
                counts["bytes_exact_duplicates"] += size
                continue
            if c.exact_dedup:
                seen.add(digest)
            if verdict >= FILTERED:
                name = FILTERS[verdict - FILTERED]
                filtered[name] += 1
                bytes_filtered[name] += size
            elif verdict == DECONTAMINATED:
                n_decontam += 1
                bytes_decontam += size
                decontaminated.append({"shard": files[scan.index].name, "line": line + 1, **scan.meta[line],
                                       "matches": scan.decontaminated[line]})
            else:
                keep_rows.append(i)
                sig_rows.append(candidate)
        surv_shard.append(np.full(len(keep_rows), scan.index, dtype=np.int64))
        surv_line.append(np.array([scan.lines[i] for i in keep_rows], dtype=np.int64))
        surv_size.append(np.array([scan.sizes[i] for i in keep_rows], dtype=np.int64))
        if scan.signatures is not None:
            sig_blocks.append(scan.signatures[np.array(sig_rows, dtype=np.int64)])
        bar.update(files[scan.index].stat().st_size)
        bar.set_postfix_str(f"{counts['files_in']:,} files, "
                            f"{_mb_per_s(counts['bytes_in'], time.perf_counter() - t0)} MB/s")
    bar.close()
    bad.check(final=True)
    scan_seconds = time.perf_counter() - t0
    shard_of, line_of, size_of = (np.concatenate(a) if a else np.zeros(0, np.int64)
                                  for a in (surv_shard, surv_line, surv_size))
    del surv_shard, surv_line, surv_size

    # Phase 2: near-duplicate clusters over the survivors, in input order; the first of each cluster is kept.
    t1 = time.perf_counter()
    clusters: list[list[int]] = []
    drop = np.zeros(len(shard_of), dtype=bool)
    signature_mb = 0.0
    if c.near_dedup and len(shard_of):
        from .dedup import duplicates_to_drop, near_duplicate_clusters

        signatures = np.concatenate(sig_blocks)
        del sig_blocks
        signature_mb = round(signatures.nbytes / 1e6, 1)
        log.info("prepare: clustering %d files (%.1f MB of signatures)", len(signatures), signature_mb)
        clusters = sorted((sorted(cl) for cl in near_duplicate_clusters(signatures, threshold=c.minhash_threshold)),
                          key=lambda cl: cl[0])
        del signatures
        drop[np.array(sorted(duplicates_to_drop(clusters)), dtype=np.int64)] = True
    near_seconds = time.perf_counter() - t1
    counts["near_duplicates"] = int(drop.sum())
    counts["bytes_near_duplicates"] = int(size_of[drop].sum())

    # Phase 3 (workers): re-read each shard and write its kept records.
    t2 = time.perf_counter()
    members: dict[int, set[int]] = {}
    for cl in clusters:
        for row in cl:
            members.setdefault(int(shard_of[row]), set()).add(int(line_of[row]))
    kept = ~drop
    bounds = np.searchsorted(shard_of, np.arange(len(files) + 1))  # survivors are in input order: shard, line
    tasks = [(i, str(f), line_of[bounds[i]:bounds[i + 1]][kept[bounds[i]:bounds[i + 1]]],
              frozenset(members.get(i, ())), str(tmp)) for i, f in enumerate(files)]
    split = {"train_files": 0, "train_bytes": 0, "valid_files": 0, "valid_bytes": 0}
    hist_out = np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)
    meta: dict[tuple[int, int], dict[str, str]] = {}
    missing = 0
    bar = progress_bar(sum(f.stat().st_size for f in files), desc="prepare: write", unit="B", unit_scale=True)
    for done in runner.map(_write_shard, tasks):
        for key in split:
            split[key] += done[key]
        hist_out += done["hist"]
        missing += done["missing"]
        meta.update({(done["index"], line): m for line, m in done["meta"].items()})
        bar.update(files[done["index"]].stat().st_size)
    bar.close()
    (tmp / "train").mkdir(exist_ok=True)
    (tmp / "valid").mkdir(exist_ok=True)
    if missing:
        raise RuntimeError(f"{missing} records to keep were not found when re-reading the raw shards; "
                           f"did {cfg.paths.resolve('raw')} change during prepare?")
    write_seconds = time.perf_counter() - t2
    with open(tmp / CLUSTERS_FILE, "w") as fh:
        for cl in clusters:
            rows = [{"shard": files[int(shard_of[r])].name, "line": int(line_of[r]) + 1,
                     **meta.get((int(shard_of[r]), int(line_of[r])), {})} for r in cl]
            fh.write(json.dumps({"size": len(cl), "members": rows}) + "\n")

    if split["valid_files"] == 0:
        log.warning("prepare: no repository fell in the valid split; raise corpus.valid_fraction")
    sizes = [len(cl) for cl in clusters]
    out_bytes = split["train_bytes"] + split["valid_bytes"]
    counts.update(bad.as_dict())
    counts.update({
        "removed_by_filter": filtered,
        "bytes_removed_by_filter": bytes_filtered,
        "decontaminated": n_decontam,
        "bytes_decontaminated": bytes_decontam,
        **split,
        "files_out": split["train_files"] + split["valid_files"],
        "bytes_out": out_bytes,
        "clusters": {"count": len(clusters), "files": sum(sizes),
                     "mean_size": round(sum(sizes) / len(sizes), 2) if sizes else 0, "max_size": max(sizes, default=0)},
        "phases": {
            "scan": {"seconds": round(scan_seconds, 2), "mb_per_s": _mb_per_s(counts["bytes_in"], scan_seconds)},
            "near_dedup": {"seconds": round(near_seconds, 2), "files": int(len(shard_of)),
                           "signature_mb": signature_mb},
            "write": {"seconds": round(write_seconds, 2), "mb_per_s": _mb_per_s(counts["bytes_in"], write_seconds)},
        },
    })
    report = {
        "filters_active": list(settings.filters.enabled),
        "decontaminate": {"benchmarks": settings.decontam.sources if settings.decontam else {},
                          "needles": len(settings.decontam.needles) if settings.decontam else 0,
                          "needles_too_short": settings.decontam.skipped_short if settings.decontam else 0},
        "decontaminated_files": decontaminated,
        "length_histogram": {"bin_edges": [round(float(x), 3) for x in LENGTH_BINS],
                             "before": hist_in.tolist(), "after": hist_out.tolist()},
    }
    return counts, report


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest finished child (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main": round(own, 1), "largest_worker": round(children, 1)}


def _plot_lengths(hist: dict[str, list], path: Path) -> None:
    """The file-length distribution before and after cleaning, as a PNG (needs matplotlib: the `plot` extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("prepare: matplotlib is not installed, no %s (pip install 'codeparrot[plot]')", path.name)
        return
    edges = np.array(hist["bin_edges"])
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("before", "raw (good records)"), ("after", "clean (train + valid)")):
        ax.stairs(hist[key], edges, label=f"{label}: {sum(hist[key]):,} files")
    ax.set_xscale("log")
    filled = np.flatnonzero(np.add(hist["before"], hist["after"]))
    if len(filled):
        ax.set_xlim(edges[max(filled[0] - 1, 0)], edges[min(filled[-1] + 2, len(edges) - 1)])
    ax.set_xlabel("file length (characters)")
    ax.set_ylabel("files")
    ax.set_title("prepare: file lengths before and after cleaning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def format_report(counts: dict[str, Any]) -> str:
    """The report as a table of files and MB removed at each step, then outputs, clusters and phase timings."""
    rows = [("in", counts["files_in"], counts["bytes_in"])]
    rows.append(("bad records (skipped)", counts.get("bad", 0), None))
    rows.append(("exact duplicates", counts["exact_duplicates"], counts["bytes_exact_duplicates"]))
    for name, n in counts["removed_by_filter"].items():
        rows.append((f"filter {name}", n, counts["bytes_removed_by_filter"][name]))
    rows.append(("decontaminated", counts["decontaminated"], counts["bytes_decontaminated"]))
    rows.append(("near duplicates", counts["near_duplicates"], counts["bytes_near_duplicates"]))
    rows.append(("out: train", counts["train_files"], counts["train_bytes"]))
    rows.append(("out: valid", counts["valid_files"], counts["valid_bytes"]))
    lines = [f"  {'':<28}{'files':>12}{'MB':>12}{'% files':>9}"]
    total = max(counts["files_in"], 1)
    for label, n, b in rows:
        mb = f"{b / 1e6:12.2f}" if b is not None else f"{'':>12}"
        lines.append(f"  {label:<28}{n:>12,}{mb}{100 * n / total:8.1f}%")
    cl = counts["clusters"]
    lines.append(f"  near-duplicate clusters: {cl['count']:,} holding {cl['files']:,} files "
                 f"(mean size {cl['mean_size']}, max {cl['max_size']})")
    for phase, p in counts["phases"].items():
        rate = f", {p['mb_per_s']} MB/s" if "mb_per_s" in p else f", {p['files']:,} files"
        lines.append(f"  phase {phase:<11}{p['seconds']:8.2f} s{rate}")
    lines.append(f"  total {counts['seconds']:.2f} s, {counts['mb_per_s']} MB/s with {counts['num_proc']} process(es); "
                 f"peak RSS {counts['peak_rss_mb']['main']} MB main, {counts['peak_rss_mb']['largest_worker']} MB "
                 "largest worker")
    return "\n".join(lines)
