"""How the `prepare` stage presents its results: report fields, the summary table, the file-length plot.

Nothing here decides what is kept; `prepare` calls these to describe what it did.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .quality import QUALITY_BUCKETS

if TYPE_CHECKING:
    from .decontaminate import Decontaminator

CLUSTERS_FILE = "near_duplicate_clusters.jsonl"
LENGTHS_PLOT = "file_lengths.png"
LENGTH_BINS = np.logspace(0, 8, 65)  # file length in UTF-8 bytes, 1 to 1e8, 8 bins per decade


def length_hist(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Counts of file lengths in LENGTH_BINS (lengths outside 1..1e8 land in the end bins)."""
    values = np.clip(np.asarray(sizes, dtype=np.float64), 1, LENGTH_BINS[-1] * 0.999)
    return np.histogram(values, bins=LENGTH_BINS)[0].astype(np.int64)


def length_histogram(before: np.ndarray, after: np.ndarray) -> dict[str, list]:
    """The report's `length_histogram`: bin edges, and counts over the good input and over the output."""
    return {"bin_edges": [round(float(x), 3) for x in LENGTH_BINS], "before": before.tolist(), "after": after.tolist()}


def quality_summary(signal: str, quality: np.ndarray, unknown: np.ndarray, valid: np.ndarray,
                    sizes: np.ndarray) -> tuple[dict[str, Any], dict[str, list]]:
    """The report's `quality` (files and bytes per bucket, in all and per split; `unknown`: files whose signal value
    was missing or invalid, bucketed low) and the written files' length histogram per bucket, from per-file arrays."""
    summary: dict[str, Any] = {"signal": signal, "buckets": {}, "unknown": int(unknown.sum())}
    lengths: dict[str, list] = {}
    if signal == "none":
        return summary, lengths
    for index, name in enumerate(QUALITY_BUCKETS):
        here = quality == index
        row = {"files": int(here.sum()), "bytes": int(sizes[here].sum())}
        for side, mask in (("train", here & ~valid), ("valid", here & valid)):
            row[f"{side}_files"], row[f"{side}_bytes"] = int(mask.sum()), int(sizes[mask].sum())
        summary["buckets"][name] = row
        lengths[name] = length_hist(sizes[here]).tolist()
    return summary, lengths


def mb_per_s(n_bytes: int, seconds: float) -> float:
    """Throughput in MB/s, rounded for the report."""
    return round(n_bytes / 1e6 / max(seconds, 1e-9), 2)


def timing(seconds: float, n_bytes: int) -> dict[str, float]:
    """A phase's `seconds` and `mb_per_s` over the whole input."""
    return {"seconds": round(seconds, 2), "mb_per_s": mb_per_s(n_bytes, seconds)}


def cluster_summary(clusters: list[list[int]]) -> dict[str, Any]:
    """Count, files held, mean and max size of the near-duplicate clusters."""
    sizes = [len(cl) for cl in clusters]
    return {"count": len(clusters), "files": sum(sizes),
            "mean_size": round(sum(sizes) / len(sizes), 2) if sizes else 0, "max_size": max(sizes, default=0)}


def write_clusters(path: Path, clusters: Iterable[list[dict[str, Any]]]) -> None:
    """One JSON line per cluster: its size and its members (shard, 1-based line, repo_name, path)."""
    with open(path, "w") as fh:
        for members in clusters:
            fh.write(json.dumps({"size": len(members), "members": members}) + "\n")


def decontamination_summary(decontam: Decontaminator | None) -> dict[str, Any]:
    """The benchmarks searched (name -> sha256 of their file) and how many needles were searched or too short."""
    return {"benchmarks": decontam.sources if decontam else {},
            "needles": len(decontam.needles) if decontam else 0,
            "needles_too_short": decontam.skipped_short if decontam else 0}


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest finished child (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main": round(own, 1), "largest_worker": round(children, 1)}


def plot_lengths(hist: dict[str, Any], path: Path, quality: dict[str, Any] | None = None) -> bool:
    """Plot the file-length distribution before and after cleaning as a PNG, with a panel of the clean files'
    lengths per quality bucket when there are buckets; False without matplotlib."""
    try:  # a dependency; an install that lacks it still cleans, without the picture
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    edges = np.array(hist["bin_edges"])
    by_quality = hist.get("after_by_quality") or {}
    fig = Figure(figsize=(7, 7 if by_quality else 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if by_quality else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for key, label in (("before", "raw (good records)"), ("after", "clean (train + valid)")):
        ax.stairs(hist[key], edges, label=f"{label}: {sum(hist[key]):,} files")
    ax.set_xscale("log")
    filled = np.flatnonzero(np.add(hist["before"], hist["after"]))
    if len(filled):  # zoom on the occupied bins, with one empty bin either side
        ax.set_xlim(edges[max(filled[0] - 1, 0)], edges[min(filled[-1] + 2, len(edges) - 1)])
    _byte_ticks(ax, edges)
    ax.set_ylabel("files")
    ax.set_title("prepare: file lengths before and after cleaning")
    ax.legend()
    if by_quality:
        _quality_panel(axes[1], edges, by_quality, quality or {})
    axes[-1].set_xlabel("file length (bytes)")
    # fixed margins: tight_layout measured every text box, a tenth of a small prepare's wall time
    fig.subplots_adjust(left=0.12, right=0.97, top=0.94 if by_quality else 0.9, bottom=0.08 if by_quality else 0.13,
                        hspace=0.3)
    fig.savefig(path)
    return True


def _byte_ticks(ax: Any, edges: np.ndarray) -> None:
    """Powers of ten labelled "1 kB", "10 kB", ..., without minor ticks: easier to read than 10^3, and the log
    scale's default mathtext labels and minor ticks were most of the plot's cost (~1 s of a small prepare)."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    powers = np.arange(np.floor(np.log10(max(edges[0], 1))), np.ceil(np.log10(edges[-1])) + 1)
    units = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
    labels = [next(f"{10 ** k / scale:g} {unit}" for scale, unit in units if 10 ** k >= scale) for k in powers]
    ax.xaxis.set_major_locator(FixedLocator(10.0 ** powers))
    ax.xaxis.set_major_formatter(FixedFormatter(labels))
    ax.xaxis.set_minor_locator(NullLocator())


def _quality_panel(ax: Any, edges: np.ndarray, by_quality: dict[str, list], quality: dict[str, Any]) -> None:
    """The clean files' lengths per quality bucket, each labelled with its files and MB."""
    buckets = quality.get("buckets", {})
    for name, counts in by_quality.items():
        mb = buckets.get(name, {}).get("bytes", 0) / 1e6
        ax.stairs(counts, edges, label=f"{name}: {sum(counts):,} files, {mb:,.1f} MB")
    ax.set_ylabel("files")
    ax.set_title(f"clean files by quality bucket (corpus.quality_signal={quality.get('signal', '?')})")
    ax.legend()


def format_report(counts: dict[str, Any]) -> str:
    """The report as a table of files and MB removed at each step, then outputs, clusters, quality buckets and
    phase timings."""
    rows = [("in", counts["files_in"], counts["bytes_in"]),
            ("bad records (skipped)", counts.get("bad", 0), None),
            ("exact duplicates", counts["exact_duplicates"], counts["bytes_exact_duplicates"])]
    for name, n in counts["removed_by_filter"].items():
        rows.append((f"filter {name}", n, counts["bytes_removed_by_filter"][name]))
    rows += [("decontaminated", counts["decontaminated"], counts["bytes_decontaminated"]),
             ("near duplicates", counts["near_duplicates"], counts["bytes_near_duplicates"]),
             ("out: train", counts["train_files"], counts["train_bytes"]),
             ("out: valid", counts["valid_files"], counts["valid_bytes"])]
    lines = [f"  {'':<28}{'files':>12}{'MB':>12}{'% files':>9}"]
    total = max(counts["files_in"], 1)
    for label, n, b in rows:
        mb = f"{b / 1e6:12.2f}" if b is not None else f"{'':>12}"
        lines.append(f"  {label:<28}{n:>12,}{mb}{100 * n / total:8.1f}%")
    left_out = counts.get("not_selected") or {}
    if left_out:  # files of other languages or extensions: not part of the corpus, so not in "in"
        lines.append("  not selected (before \"in\"): " + ", ".join(
            f"{reason} {t['files']:,} files ({t['bytes'] / 1e6:.2f} MB)" for reason, t in left_out.items()))
    cl = counts["clusters"]
    lines.append(f"  near-duplicate clusters: {cl['count']:,} holding {cl['files']:,} files "
                 f"(mean size {cl['mean_size']}, max {cl['max_size']})")
    quality = counts.get("quality", {})
    if quality.get("buckets"):
        shares = ", ".join(f"{name} {b['files']:,} ({b['bytes'] / 1e6:.2f} MB)"
                           for name, b in quality["buckets"].items())
        lines.append(f"  quality buckets ({quality['signal']}): {shares}; {quality['unknown']:,} with an unknown "
                     "signal value (low)")
    for phase, p in counts["phases"].items():
        rate = f", {p['mb_per_s']} MB/s" if "mb_per_s" in p else f", {p['files']:,} files"
        lines.append(f"  phase {phase:<11}{p['seconds']:8.2f} s{rate}")
    rss = counts["peak_rss_mb"]
    lines.append(f"  total {counts['seconds']:.2f} s, {counts['mb_per_s']} MB/s with {counts['num_proc']} process(es); "
                 f"peak RSS {rss['main']} MB main, {rss['largest_worker']} MB largest worker")
    return "\n".join(lines)
