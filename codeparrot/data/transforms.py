"""Document transforms of the training data: a quality token in front, and fill-in-the-middle (FIM).

A transformed document is (a contract shared with generation, which builds its prompts the same way):
- quality tokens on: `[<quality_b>] + doc`; a document without a known bucket gets no token;
- PSM: `[<fim_prefix>] + P + [<fim_suffix>] + S + [<fim_middle>] + M`;
- SPM (StarCoder's, as bigcode's Megatron-LM writes it): `[<fim_prefix>, <fim_suffix>] + S + [<fim_middle>] + P + M`;
- both: the quality token first, then the FIM form. The data paths add EOS after each document, as without transforms.

A FIM document is cut at two uniform character positions, sorted, into prefix P, middle M and suffix S, and the
three pieces are tokenized apart: in the streaming path (data/packing.py) from the text, in the token-shard path
(data/tokens.py, `transform_block`) from the fragment decoded back to text, as bigcode's Megatron-LM does. A cut at
token boundaries only would never end a prefix in a bare newline before an indented line (`\n   ` is one token),
the very shape of an infilling prompt. The same key gives the same cut in both paths. Every random choice is a function of a document key, (seed, epoch, document),
never of a running RNG: a resumed or differently sharded run transforms each document as an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence, TypeVar

from ..corpus.quality import QUALITY_BUCKETS, UNKNOWN_QUALITY
from ..tokenizer import FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, quality_token

_BUCKET_INDEX = {name: i for i, name in enumerate(QUALITY_BUCKETS)}
Doc = TypeVar("Doc", str, Sequence[int])  # a document as text (streaming) or as token ids (token shards)


class SpecialIds(NamedTuple):
    """The ids of the FIM sentinels and of the quality tokens (indexed by bucket) in one tokenizer."""

    prefix: int
    middle: int
    suffix: int
    pad: int
    quality: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        """The reserved ids of a `tokenizers.Tokenizer`; one trained before they were reserved is refused."""
        names = [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, *(quality_token(b) for b in QUALITY_BUCKETS)]
        ids = {name: tok.token_to_id(name) for name in names}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} token: it was trained before the FIM and "
                             f"quality tokens were reserved; rerun `codeparrot train-tokenizer` (and `pretokenize`) "
                             f"to train with data.fim_rate > 0 or data.quality_tokens")
        return cls(*(ids[name] for name in names[:4]), tuple(ids[name] for name in names[4:]))


class FimCut(NamedTuple):
    """How one document is FIM'd: middle = doc[start:end], in SPM or PSM order."""

    spm: bool
    start: int
    end: int


def bucket_index(name: object) -> int:
    """A record's `quality` field as an index into QUALITY_BUCKETS; UNKNOWN_QUALITY when absent or unknown."""
    return _BUCKET_INDEX.get(name, UNKNOWN_QUALITY) if isinstance(name, str) else UNKNOWN_QUALITY


def document_key(*parts: int) -> bytes:
    """The key of every random choice about one document: (seed, epoch, then what names the document)."""
    return ("fim/" + "/".join(map(str, parts))).encode()


def uniforms(key: bytes, n: int) -> list[float]:
    """`n` (at most 8) uniform floats in [0, 1), a function of `key` alone."""
    # A stable digest rather than hash() or a running RNG: the same in every process, worker, resume and version.
    digest = hashlib.blake2b(key, digest_size=8 * n).digest()
    return [(int.from_bytes(digest[8 * i:8 * i + 8], "little") >> 11) / 2 ** 53 for i in range(n)]  # 53 bits


def draw_cut(key: bytes, length: int, rate: float, spm_rate: float) -> FimCut | None:
    """Whether the document of `key` (`length` characters or tokens) is FIM'd, and if so where and in which order."""
    if rate <= 0.0 or length == 0:  # an empty document stays empty: no sentinels around nothing
        return None
    u_fim, u_spm, u_a, u_b = uniforms(key, 4)
    if u_fim >= rate:
        return None
    start, end = sorted(int(u * (length + 1)) for u in (u_a, u_b))  # each in [0, length], as Megatron's randint
    return FimCut(u_spm < spm_rate, start, end)


def split_at(doc: Doc, cut: FimCut) -> tuple[Doc, Doc, Doc]:
    """(prefix, middle, suffix) of a text or a token sequence."""
    return doc[:cut.start], doc[cut.start:cut.end], doc[cut.end:]


def fim_join(prefix: Sequence[int], middle: Sequence[int], suffix: Sequence[int], spm: bool,
             ids: SpecialIds) -> list[int]:
    """One FIM document's ids in SPM or PSM order (the forms of the module docstring)."""
    if spm:
        return [ids.prefix, ids.suffix, *suffix, ids.middle, *prefix, *middle]
    return [ids.prefix, *prefix, ids.suffix, *suffix, ids.middle, *middle]


def untransform(doc: Sequence[int], ids: SpecialIds) -> tuple[int, list[int]]:
    """The inverse of a transform: (bucket index or UNKNOWN_QUALITY, the original ids P + M + S) of one document."""
    doc = list(doc)
    bucket = UNKNOWN_QUALITY
    if doc and doc[0] in ids.quality:
        bucket, doc = ids.quality.index(doc[0]), doc[1:]
    if not doc or doc[0] != ids.prefix:
        return bucket, doc
    mid = doc.index(ids.middle)
    if doc[1] == ids.suffix:  # SPM; PSM with an empty prefix reads the same and reassembles the same way
        return bucket, doc[mid + 1:] + doc[2:mid]
    suf = doc.index(ids.suffix)
    return bucket, doc[1:suf] + doc[mid + 1:] + doc[suf + 1:mid]


def fit_length(ids: list[int], length: int, pad: int) -> list[int]:
    """`ids` cut to `length`, or padded to it with `pad`, as bigcode's Megatron fits a FIM sample to its window."""
    return ids[:length] + [pad] * (length - len(ids))


@dataclass(frozen=True)
class Transforms:
    """What happens to each document: its quality token in front, FIM at `fim_rate` (SPM at `fim_spm_rate`)."""

    ids: SpecialIds
    quality_tokens: bool = False
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    codec: Any = None  # the tokenizers.Tokenizer of token shards: FIM decodes a fragment, cuts text, encodes pieces

    def __post_init__(self) -> None:
        for name in ("fim_rate", "fim_spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")

    @property
    def active(self) -> bool:
        """Whether any document can change."""
        return self.quality_tokens or self.fim_rate > 0.0

    def cut(self, key: bytes, length: int) -> FimCut | None:
        """The FIM cut of the document of `key`, or None when it stays left-to-right."""
        return draw_cut(key, length, self.fim_rate, self.fim_spm_rate)

    def pieces(self, text: str, cut: FimCut | None) -> tuple[str, ...]:
        """The texts to tokenize for one document: itself, or its prefix, middle and suffix."""
        return (text,) if cut is None else split_at(text, cut)

    def assemble(self, pieces: Sequence[Sequence[int]], cut: FimCut | None, bucket: int) -> list[int]:
        """One document's ids from its tokenized pieces: the quality token, then the plain or the FIM form."""
        out = [self.ids.quality[bucket]] if self.quality_tokens and bucket < len(self.ids.quality) else []
        if cut is None:
            (doc,) = pieces
            return out + list(doc)
        return out + fim_join(*pieces, cut.spm, self.ids)

    def tokens(self, doc: Sequence[int], key: bytes, bucket: int) -> list[int]:
        """A document given as token ids, transformed: cut at characters when there is a codec, else at tokens."""
        text = self.codec.decode(list(doc), skip_special_tokens=False) if self.codec and self.fim_rate else None
        if text is None or "\ufffd" in text:  # no codec, or a fragment cut inside a UTF-8 character: token cut
            cut = self.cut(key, len(doc))
            return self.assemble((doc,) if cut is None else split_at(doc, cut), cut, bucket)
        cut = self.cut(key, len(text))
        if cut is None:
            return self.assemble((doc,), None, bucket)
        pieces = self.codec.encode_batch_fast(list(split_at(text, cut)), add_special_tokens=False)
        return self.assemble([p.ids for p in pieces], cut, bucket)


def transform_block(block: Sequence[int], eos: int, doc_starts: dict[int, int], transforms: Transforms,
                    block_key: tuple[int, ...]) -> list[int]:
    """A token-shard block with each EOS-separated fragment transformed on its own, fit back to len(block).

    As bigcode's Megatron-LM does for a sample that spans documents: the block is split at EOS into fragments (the
    first and the last may be parts of documents that start or end outside the block), fragment j is FIM'd with
    key (*block_key, j), the EOS tokens stay between the fragments, and the result is cut to the block's length
    (each FIM fragment adds 3 sentinels and each quality token 1, pushing the block's last tokens out) or padded
    with <fim_pad>. `doc_starts` maps the block positions where a document starts to its bucket index: only there
    does a quality token go, so a fragment continuing a document from the block before gets none.
    """
    block = list(block)
    out: list[int] = []
    start = 0
    ends = [i for i, t in enumerate(block) if t == eos] + [len(block)]
    for j, end in enumerate(ends):
        if start == end == len(block):  # nothing after a final EOS
            break
        out += transforms.tokens(block[start:end], document_key(*block_key, j),
                                 doc_starts.get(start, UNKNOWN_QUALITY))
        if end < len(block):
            out.append(eos)
        start = end + 1
    return fit_length(out, len(block), transforms.ids.pad)
