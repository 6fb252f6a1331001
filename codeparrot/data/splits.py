"""The dataset of a split for training or evaluation: token shards when `data.pretokenized`, else streamed text."""
from __future__ import annotations

import logging

from torch.utils.data import IterableDataset

from ..artifacts import fingerprint
from ..config import Config
from ..corpus.source import list_shards
from .packing import ConstantLengthDataset
from .tokens import TokenShardDataset

log = logging.getLogger(__name__)


def split_dataset(cfg: Config, split: str, tokenizer, rank: int, world_size: int, infinite: bool,
                  seq_length: int | None = None) -> IterableDataset:
    """Blocks of `split` ("train" or "valid") for consumer `rank` of `world_size`; train order is shuffled.

    data.quality_tokens applies to both splits; data.fim_rate to train only, so that validation loss stays
    left-to-right and comparable between runs with and without FIM. data.document_mask applies to both (its
    loader's batches name each token's document: packing.DocumentBlocks).
    """
    from .transforms import SpecialIds, Transforms

    d = cfg.data
    seq_length = seq_length or d.seq_length
    shuffle = split == "train"
    fim_rate = d.fim_rate if split == "train" else 0.0
    only, condition = _quality_selection(cfg, split)
    quality_tokens = d.quality_tokens or condition is not None
    transforms = None
    if quality_tokens or fim_rate > 0:
        transforms = Transforms(SpecialIds.from_tokenizer(tokenizer), quality_tokens, fim_rate, d.fim_spm_rate,
                                codec=tokenizer)
    if d.pretokenized and only is None and condition is None:
        # token shards: blocks read by memmap, train order shuffled by (train.seed, epoch)
        return TokenShardDataset(cfg.paths.resolve("tokens"), split, seq_length, infinite=infinite,
                                 shuffle=shuffle and d.shuffle, seed=cfg.train.seed, rank=rank, world_size=world_size,
                                 tokenizer_fingerprint=fingerprint(cfg.paths.resolve("tokenizer")),
                                 transforms=transforms, document_mask=d.document_mask)
    return ConstantLengthDataset(
        list_shards(cfg.paths.resolve("clean") / split), tokenizer, seq_length,
        tokenizer.token_to_id(cfg.tokenizer.eos_token), chars_per_token=d.chars_per_token,
        num_of_sequences=d.num_of_sequences, infinite=infinite, shuffle=shuffle and d.shuffle,
        seed=cfg.train.seed, rank=rank, world_size=world_size, max_bad_ratio=cfg.corpus.max_bad_ratio,
        transforms=transforms, only_quality=only, condition_on=condition, document_mask=d.document_mask)


def _quality_selection(cfg: Config, split: str) -> tuple[int | None, int | None]:
    """(bucket index of the only files read, bucket index of the token every file gets) from eval.quality_bucket
    and eval.quality_token, for the valid split; both select records, so that split is read from clean/valid."""
    from .transforms import bucket_index

    e = cfg.eval
    if split != "valid" or not (e.quality_bucket or e.quality_token):
        return None, None
    if cfg.data.pretokenized:
        log.info("evaluate: eval.quality_bucket/quality_token read clean/valid's records, not the token shards")
    return (bucket_index(e.quality_bucket) if e.quality_bucket else None,
            bucket_index(e.quality_token) if e.quality_token else None)
