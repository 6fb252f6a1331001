"""MinHash signatures of files, vectorised over a batch: shingles, their base hashes, and two signature schemes.

Shingles are CodeParrot's set of alphanumeric tokens (or BigCode's token n-grams). Each distinct shingle gets a
32-bit base hash; a signature of `num_perm` uint32 entries is then built from those by one of two schemes, whose
share of equal entries between two files estimates their Jaccard similarity without bias (dedup.py bands them):

- "oph" (default): one permutation hashing with optimal densification (Li, Owen & Zhang 2012; Shrivastava 2017).
  One hash per shingle picks its bin and its value; an entry is its bin's minimum, and an empty bin copies the
  entry of the first filled bin along a fixed random probe sequence, the same for every file. O(shingles + bins)
  per file.
- "permutations": classic MinHash, `num_perm` independent hash functions, each entry the minimum of one over the
  shingles. O(shingles x bins): 4x the time of the whole scan's other work.
"""
from __future__ import annotations

import hashlib
import string

import numpy as np

SCHEMES = ("oph", "permutations")
# Every byte that is not [A-Za-z_0-9] becomes a space. On UTF-8 bytes this splits exactly like CodeParrot's
# re.split(r"[^A-Za-z_0-9]+", content) on str (non-ASCII characters are all bytes >= 0x80: separators), ~2x faster.
_TOKEN_BYTES = frozenset((string.ascii_letters + string.digits + "_").encode())
_SEPARATE = bytes(c if c in _TOKEN_BYTES else 0x20 for c in range(256))
EMPTY_VALUE = np.uint32(0xFFFFFFFF)  # every entry of the signature of a file without shingles
BLOCK = 256  # shingles per [BLOCK, num_perm] uint64 work array (512 KiB at 256 perms): stays in L2 cache
PROBES_PER_BIN = 4  # densification's probe sequence: 4 x num_perm bins, then the next filled bin (a 1-shingle file)
# The base hash: a polynomial in SHINGLE_BASE over the bytes of the shingle and its "\n" (so that the length counts
# too), mod 2**64, then murmur3's 64-bit finaliser, whose top 32 bits are kept. Vectorised over all shingles of a
# batch at once.
SHINGLE_BASE = int.from_bytes(hashlib.blake2b(b"minhash-shingle-base", digest_size=8).digest(), "little") | 1
_FMIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_U64 = (1 << 64) - 1


def _shingle_bytes(content: str, ngram: int = 1) -> set[bytes]:
    """The shingles as ASCII bytes (what gets hashed)."""
    tokens = content.encode("utf-8", "surrogatepass").translate(_SEPARATE).split()
    if ngram <= 1 or len(tokens) < ngram:
        return set(tokens)  # a file shorter than one n-gram is represented by its tokens
    return {b" ".join(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1)}


def shingles(content: str, ngram: int = 1) -> set[str]:
    """The set of alphanumeric tokens (ngram=1) or space-joined token n-grams (fewer tokens than n: the tokens)."""
    return {s.decode("ascii") for s in _shingle_bytes(content, ngram)}


def shingle_hash(shingle: bytes) -> int:
    """One shingle's 32-bit base hash, plainly: what MinHasher.base_hashes computes for many at once."""
    h = 0
    for k, byte in enumerate(shingle + b"\n"):
        h = (h + byte * pow(SHINGLE_BASE, k, 1 << 64)) & _U64
    h ^= h >> 33
    h = h * int(_FMIX[0]) & _U64
    h ^= h >> 33
    h = h * int(_FMIX[1]) & _U64
    h ^= h >> 33
    return h >> 32


def _fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's finaliser, in place on uint64 (every output bit depends on every input bit)."""
    x ^= x >> np.uint64(33)
    x *= _FMIX[0]  # wraps mod 2**64, on purpose
    x ^= x >> np.uint64(33)
    x *= _FMIX[1]
    x ^= x >> np.uint64(33)
    return x


_powers = np.ones(1, dtype=np.uint64)  # SHINGLE_BASE**k mod 2**64, grown to the longest shingle seen


def _base_powers(n: int) -> np.ndarray:
    global _powers
    if len(_powers) < n:
        steps = np.full(max(n, 2 * len(_powers)), SHINGLE_BASE, dtype=np.uint64)
        steps[0] = 1
        _powers = np.cumprod(steps, dtype=np.uint64)  # wraps mod 2**64
    return _powers


def random_words(label: str, n: int) -> np.ndarray:
    """[n] uint64 pseudo-random words from blake2b: stable across machines and numpy versions."""
    raw = b"".join(hashlib.blake2b(f"{label}:{i}".encode(), digest_size=8).digest() for i in range(n))
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


class MinHasher:
    """MinHash signatures of files: [N, num_perm] uint32 from the shingles' 32-bit base hashes (module docstring).

    "permutations": hash function i is multiply-add-shift, h_i(x) = ((a_i*x + b_i) mod 2**64) >> 32 with random
    64-bit a_i, b_i and 32-bit x: strongly universal (Dietzfelbinger 1996) and exact in uint64 wrap-around. (The
    prime-field form (a*x + b) mod 2**61-1 with a, b, x < 2**32 would not do: a*x < 2**64 wraps the prime at most 8
    times, so the permutations pick correlated minima; measured on stdlib files: 2.4x the Jaccard error.)
    "oph": z = fmix64(a*x + b) for one random a, b; its top 32 bits pick the bin (a multiply-shift into
    [0, num_perm)), its low 32 bits are the value.
    """

    def __init__(self, num_perm: int = 256, ngram: int = 1, seed: int = 1, scheme: str = "oph"):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown MinHash scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        self.num_perm, self.ngram, self.seed, self.scheme = num_perm, ngram, seed, scheme
        if scheme == "permutations":
            self.a = random_words(f"minhash-a:{seed}", num_perm)  # [P] uint64
            self.b = random_words(f"minhash-b:{seed}", num_perm)  # [P] uint64
        else:
            self.a, self.b = random_words(f"oph-a:{seed}", 1) | np.uint64(1), random_words(f"oph-b:{seed}", 1)
            # [T, P] bin probed at step t for an empty bin j: PCG64's raw stream is fixed across numpy versions
            raw = np.random.PCG64(seed).random_raw(PROBES_PER_BIN * num_perm * num_perm).astype(np.uint64)
            self.probes = ((raw >> np.uint64(32)) * np.uint64(num_perm) >> np.uint64(32)).astype(np.int64).reshape(
                PROBES_PER_BIN * num_perm, num_perm)

    def base_hashes(self, contents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """([S] uint32 shingle_hash of each file's distinct shingles, file after file; [N] int64 counts per file)."""
        shingles: list[bytes] = []
        counts = np.empty(len(contents), dtype=np.int64)
        for i, content in enumerate(contents):
            distinct = _shingle_bytes(content, self.ngram)
            counts[i] = len(distinct)
            shingles.extend(distinct)
        if not shingles:
            return np.zeros(0, dtype=np.uint32), counts
        data = np.frombuffer(b"\n".join(shingles) + b"\n", dtype=np.uint8)  # [L] every shingle and its "\n"
        ends = np.flatnonzero(data == 10)  # [S] (shingles never hold a newline: every byte but [A-Za-z_0-9 ] is one)
        starts = np.r_[0, ends[:-1] + 1]
        offset = np.arange(len(data)) - np.repeat(starts, ends - starts + 1)  # [L] each byte's place in its shingle
        terms = data.astype(np.uint64) * _base_powers(int(offset.max()) + 1)[offset]  # [L]
        return (_fmix64(np.add.reduceat(terms, starts)) >> np.uint64(32)).astype(np.uint32), counts

    def signature(self, content: str) -> np.ndarray:
        """[num_perm] uint32; a file without shingles gets all EMPTY_VALUE."""
        return self.signatures([content])[0]

    def signatures(self, contents: list[str]) -> np.ndarray:
        """[N, num_perm] uint32; a file without shingles gets all EMPTY_VALUE."""
        hashes, counts = self.base_hashes(contents)
        if self.scheme == "permutations":
            return self._permutations(hashes, counts)
        return self._one_permutation(hashes, counts)

    def _one_permutation(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        n, p = len(counts), self.num_perm
        z = _fmix64(hashes.astype(np.uint64) * self.a + self.b)  # [S]
        cell = np.repeat(np.arange(n) * p, counts) + ((z >> np.uint64(32)) * np.uint64(p) >> np.uint64(32)).astype(
            np.int64)  # [S] file * P + bin
        out = np.full(n * p, EMPTY_VALUE, dtype=np.uint32)
        np.minimum.at(out, cell, (z & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        filled = np.zeros(n * p, dtype=bool)
        filled[cell] = True
        out, filled = out.reshape(n, p), filled.reshape(n, p)
        self._densify(out, filled, counts > 0)
        return out

    def _densify(self, out: np.ndarray, filled: np.ndarray, has_shingles: np.ndarray) -> None:
        """Each empty bin of a file with shingles takes the entry of the first filled bin of its probe sequence."""
        rows, cols = np.nonzero(~filled & has_shingles[:, None])  # [E] the empty bins
        for probe in self.probes:  # writes go to empty bins and reads to filled ones: in place is safe
            if not len(rows):
                return
            source = probe[cols]
            hit = filled[rows, source]
            out[rows[hit], cols[hit]] = out[rows[hit], source[hit]]
            rows, cols = rows[~hit], cols[~hit]
        for r, c in zip(rows.tolist(), cols.tolist()):  # past the sequence (files of a few shingles): next filled
            source = (c + 1 + np.flatnonzero(np.roll(filled[r], -c - 1))[0]) % self.num_perm
            out[r, c] = out[r, source]

    def _permutations(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        n = len(counts)
        out = np.full((n, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)  # [N, P]
        flat = hashes.astype(np.uint64)  # [T] all shingles of all files, file after file
        owner = np.repeat(np.arange(n), counts)  # [T] the file each shingle belongs to
        work = np.empty((BLOCK, self.num_perm), dtype=np.uint64)
        for start in range(0, len(flat), BLOCK):  # cache-sized blocks of shingles
            x, doc = flat[start:start + BLOCK], owner[start:start + BLOCK]
            values = work[:len(x)]  # [B, P]
            np.multiply(x[:, None], self.a[None, :], out=values)  # mod 2**64 by wrap-around, on purpose
            values += self.b[None, :]
            # A block holds whole runs of consecutive files (and parts of the first/last): min per run.
            runs = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
            rows = doc[runs]
            out[rows] = np.minimum(out[rows], np.minimum.reduceat(values, runs, axis=0))
        # The minimum of the top 32 bits is the top 32 bits of the minimum: 4 bytes per entry, 1 KiB at 256.
        return (out >> np.uint64(32)).astype(np.uint32)
