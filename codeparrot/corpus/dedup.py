"""Near-deduplication: LSH banding of MinHash signatures (minhash.py) and duplicate clusters.

The share of equal entries between two signatures estimates their files' Jaccard similarity. LSH bands the
signatures so that only files sharing a band are compared, and union-find joins the verified pairs into clusters, of which the first file in input order is kept. Clustering runs
on numpy arrays, band by band (~50-100 bytes per file beyond the signatures). `prepare` computes the signatures in
its scan workers (corpus/shards.py) and clusters them here.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Iterator

import numpy as np

from .minhash import random_words

VERIFIED_FN_WEIGHT = 0.9  # with verification an LSH false positive costs one signature comparison: favour recall
MAX_BUCKET = 8  # a file is paired with the first 8 files of its band key: bounds candidates when thousands collide


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The share of equal signature entries: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def exact_jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets count as identical (1.0), as their signatures do."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false-positive + false-negative area.

    As datasketch does: a pair of similarity s becomes a candidate with probability 1 - (1 - s**rows)**bands;
    false positives are that probability integrated over s in [0, threshold], false negatives its complement over
    [threshold, 1].
    """
    def area(f: np.ndarray, a: float, b: float) -> float:  # trapezoid rule on a uniform grid
        return float((f.sum() - (f[0] + f[-1]) / 2) * (b - a) / (len(f) - 1))

    lo, hi = np.linspace(0.0, threshold, 1001), np.linspace(threshold, 1.0, 1001)
    best, best_error = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = area(1 - (1 - lo ** rows) ** bands, 0.0, threshold)
            fn = area((1 - hi ** rows) ** bands, threshold, 1.0)
            error = fp_weight * fp + fn_weight * fn
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


class LSHBands:
    """MinHash LSH banding: `bands` bands of `rows` signature entries, each hashed to a 60-bit key.

    Two files whose keys agree in some band become a candidate pair; `lsh_params` picks (bands, rows) for the
    threshold.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 256, fp_weight: float = 0.5, fn_weight: float = 0.5):
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm, fp_weight, fn_weight)
        self._mult = random_words("lsh-band", self.rows) | np.uint64(1)  # [rows] odd multipliers

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """[N, num_perm] signatures -> [N, bands] uint64 keys < 2**60 (a universal multiply-sum hash per band)."""
        n = signatures.shape[0]
        bands = signatures[:, :self.bands * self.rows].reshape(n, self.bands, self.rows).astype(np.uint64)
        # 60 bits: collisions stay ~2**-60 per pair and band.
        return (bands * self._mult).sum(axis=2) >> np.uint64(4)


KEY_CHUNK = 8192  # files per band-key block: [KEY_CHUNK, rows] uint64 temporaries of ~1.2 MB at 19 rows
VERIFY_CHUNK = 1024  # candidate pairs compared per block: two [VERIFY_CHUNK, num_perm] gathers, ~2.3 MB at 256


def _band_column(signatures: np.ndarray, index: LSHBands, band: int) -> np.ndarray:
    """[N] uint64: `index.band_keys(signatures)[:, band]`, computed in blocks of KEY_CHUNK files (bounded scratch)."""
    cols = slice(band * index.rows, (band + 1) * index.rows)
    keys = np.empty(len(signatures), dtype=np.uint64)
    for start in range(0, len(signatures), KEY_CHUNK):
        block = signatures[start:start + KEY_CHUNK, cols].astype(np.uint64)
        block *= index._mult  # mod 2**64 by wrap-around, exactly as band_keys
        keys[start:start + KEY_CHUNK] = block.sum(axis=1) >> np.uint64(4)
    return keys


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Union-find roots of the ids `x` (pointer jumping over the subset; parents always point to smaller ids)."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the pairs (a[i], b[i]): hook each larger root to the smallest root paired with it, until all pairs share
    a root (each round removes at least one root), then point every touched id straight at its root."""
    x, y = a, b
    while len(x):
        rx, ry = _roots(parent, x), _roots(parent, y)
        apart = rx != ry
        if not apart.any():
            break
        x, y, rx, ry = x[apart], y[apart], rx[apart], ry[apart]
        np.minimum.at(parent, np.maximum(rx, ry), np.minimum(rx, ry))
    parent[a] = _roots(parent, a)
    parent[b] = _roots(parent, b)


def _band_pairs(order: np.ndarray, sorted_keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Candidate pairs (earlier, later) of one band, as int64 arrays, at most N pairs per yield.

    `order` is an argsort of the band's keys; the files of each run of equal keys are put in input order here (in
    place: sorting only the runs is cheaper than a stable sort of all N keys). Each file is paired with the first
    MAX_BUCKET files of its run, as a bucket of MAX_BUCKET ids would pair it (one yield per rank d: the run's
    (d+1)-th file with every later one); beyond MAX_BUCKET, also with its predecessor in the run, which keeps chains
    of similar files linked in big runs at linear cost.
    """
    same = sorted_keys[1:] == sorted_keys[:-1]  # [N-1]
    later = np.flatnonzero(same) + 1  # sorted positions of every run member but the first
    if not len(later):
        return
    del same
    first = np.flatnonzero(np.r_[True, np.diff(later) != 1])  # where each run's `later` block begins
    run_start = np.repeat(later[first] - 1, np.diff(np.r_[first, len(later)]))  # sorted position of the run's head
    rank = later - run_start  # 1.. : position within the run
    heads = later[first] - 1
    in_runs = np.sort(np.r_[heads, later])  # sorted positions of every run member, run after run
    run_of = np.cumsum(np.isin(in_runs, heads)) - 1  # each run begins at its head
    order[in_runs] = order[in_runs][np.lexsort((order[in_runs], run_of))]
    del in_runs, run_of
    for d in range(MAX_BUCKET):
        take = rank > d
        if not take.any():
            break
        yield order[run_start[take] + d], order[later[take]]
    take = rank > MAX_BUCKET
    if take.any():
        yield order[later[take] - 1], order[later[take]]


def near_duplicate_clusters(signatures: np.ndarray, threshold: float = 0.85, verify: bool = True) -> list[list[int]]:
    """Clusters (size >= 2, sorted ids, ordered by first id) of rows of `signatures` [N, num_perm] in insertion order.

    Candidates are LSH's (with `verify`, bands chosen with VERIFIED_FN_WEIGHT to favour recall): per band, files
    sharing a key, each paired with the first MAX_BUCKET files of its key in input order, plus, past those, its
    predecessor. With `verify` a pair is joined only if its estimated Jaccard reaches
    `threshold` (LSH false positives removed); pairs already in one cluster are not compared again.

    All in numpy arrays, one band at a time, with no Python object per file. Memory beyond the signatures: the
    int64 union-find parent array (8 B/file) and, per band, its keys, their argsort and the sorted keys (24 B/file,
    plus the sort's scratch), plus fixed scratch (KEY_CHUNK, VERIFY_CHUNK: a few MB). Tracemalloc peak, result
    included: ~48 B/file at 1-3M files with 10% near-copies, ~95 B/file at 50k where the fixed scratch weighs more
    (tests/test_dedup.py checks < 400 B/file with planted clusters). Files in runs
    of equal keys add ~40 B each while their band is processed (run positions; at most N candidate pairs per step),
    and the returned lists ~40 B per clustered file. (A dict per band, the textbook index, took ~4.2 KB/file.)
    """
    n, num_perm = signatures.shape
    index = verified_bands(threshold, num_perm) if verify else LSHBands(threshold, num_perm)
    parent = np.arange(n, dtype=np.int64)  # union-find; a parent is always <= its child, so a root is its cluster's min
    for band in range(index.bands):
        keys = _band_column(signatures, index, band)
        order = np.argsort(keys)  # _band_pairs puts each run of equal keys in input order
        _join_band(parent, signatures, order, keys[order], threshold, verify)
    return _clusters(parent)


def verified_bands(threshold: float, num_perm: int) -> LSHBands:
    """The banding used when candidates are verified: tilted towards recall (VERIFIED_FN_WEIGHT)."""
    return LSHBands(threshold, num_perm, fp_weight=1 - VERIFIED_FN_WEIGHT, fn_weight=VERIFIED_FN_WEIGHT)


def clusters_from_runs(signatures: np.ndarray, bands: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float
                       ) -> list[list[int]]:
    """near_duplicate_clusters(verify=True) from runs of equal band keys found elsewhere (datatrove's buckets).

    Each band is (members, run): the ids of the files that share a key with another file, run after run, and the run
    each belongs to (non-decreasing). The candidates and verdicts are near_duplicate_clusters' own, so the clusters
    are identical; `signatures` may be a read-only memory map.
    """
    parent = np.arange(len(signatures), dtype=np.int64)
    for members, run in bands:
        _join_band(parent, signatures, members.astype(np.int64, copy=True), run, threshold, True)
    return _clusters(parent)


def _join_band(parent: np.ndarray, signatures: np.ndarray, order: np.ndarray, sorted_keys: np.ndarray,
               threshold: float, verify: bool) -> None:
    """Union the band's candidate pairs (those whose estimated Jaccard reaches `threshold`, with `verify`)."""
    need = threshold * signatures.shape[1] - 1e-9  # equal entries needed; compared as counts to dodge float rounding
    for a, b in _band_pairs(order, sorted_keys):
        apart = _roots(parent, a) != _roots(parent, b)  # joined pairs need no comparison
        a, b = a[apart], b[apart]
        if verify and len(a):
            keep = np.empty(len(a), dtype=bool)
            for s in range(0, len(a), VERIFY_CHUNK):
                equal = np.count_nonzero(signatures[a[s:s + VERIFY_CHUNK]] == signatures[b[s:s + VERIFY_CHUNK]],
                                         axis=1)
                keep[s:s + VERIFY_CHUNK] = equal >= need
            a, b = a[keep], b[keep]
        if len(a):
            _union(parent, a, b)


def _clusters(parent: np.ndarray) -> list[list[int]]:
    """The union-find's groups of two or more ids: sorted ids, ordered by their first id."""
    n = len(parent)
    while True:  # full path compression: every id points at its root
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    sizes = np.bincount(parent, minlength=n)
    members = np.flatnonzero(sizes[parent] > 1)  # ascending ids of files in clusters
    if not len(members):
        return []
    members = members[np.argsort(parent[members], kind="stable")]  # grouped by root = first member, ids ascending
    bounds = np.flatnonzero(np.diff(parent[members])) + 1
    return [group.tolist() for group in np.split(members, bounds)]


def duplicates_to_drop(clusters: list[list[int]]) -> set[int]:
    """Every member but the first (lowest id = first in input order) of each cluster.

    Keeping the first is deterministic and matches exact dedup's first-occurrence rule, so re-runs and shard orders
    agree; CodeParrot instead kept each cluster's 'extreme' members, which needs a second pass over contents.
    """
    return {i for cluster in clusters for i in sorted(cluster)[1:]}
