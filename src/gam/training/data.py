"""The training data stream: corpus -> tokenizer -> cached ids -> blocks -> batches.

The order of the training blocks is a pure function of ``(seed, epoch)``: epoch ``e`` visits the
blocks in ``numpy.random.default_rng([seed, e]).permutation(n_blocks)``, cut into global batches
of ``batch_size`` blocks (the incomplete last batch of an epoch is dropped, so every step sees
exactly ``batch_size`` blocks). With N processes, rank r takes the r-th contiguous slice of
every global batch (the same global data order as one process, like ``DistributedSampler`` over
each batch). A resumed run therefore rebuilds the permutation of its epoch and skips exactly the
batches it has consumed; no sampler state has to be stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Sampler

from gam.data import Corpus, TokenBlocks, encode_corpus, load_corpus, train_tokenizer
from gam.models.io import CheckpointError
from gam.training.config import DataConfig, TokenizerConfig
from gam.training.distributed import DistContext


def epoch_permutation(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` (0-based) visits ``n_blocks`` training blocks."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_blocks)


class EpochBatchSampler(Sampler[list[int]]):
    """Block indices of this rank's share of every global batch of one epoch, from batch
    ``start_batch`` on (see the module docstring)."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the number of "
                             f"processes {world_size}")
        self.n_blocks = n_blocks
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.num_batches = n_blocks // batch_size

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.n_blocks, self.seed, self.epoch)
        per_rank = self.batch_size // self.world_size
        for b in range(self.start_batch, self.num_batches):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()


def epoch_loader(blocks: TokenBlocks, batch_size: int, seed: int, epoch: int,
                 ctx: DistContext, start_batch: int = 0) -> DataLoader:
    """A DataLoader over this rank's share of epoch ``epoch`` from batch ``start_batch``.

    It gets its own generator: a DataLoader without one draws its base seed from the global
    torch RNG whenever an iterator is created, which would shift the dropout stream of a
    resumed run.
    """
    sampler = EpochBatchSampler(len(blocks), batch_size, seed, epoch, ctx.rank,
                                ctx.world_size, start_batch)
    return DataLoader(blocks, batch_sampler=sampler, num_workers=0,
                      generator=torch.Generator().manual_seed(0),
                      pin_memory=ctx.device.type == "cuda")


@dataclass
class RunData:
    corpus: Corpus
    tokenizer: Tokenizer
    ids: dict[str, np.ndarray]


def load_data(data: DataConfig, tok: TokenizerConfig, ctx: DistContext,
              cache_dir: str | os.PathLike[str] | None = None,
              tokenizer: Tokenizer | None = None, splits: tuple[str, ...] = ("train", "valid"),
              data_dir: str | None = None) -> RunData:
    """Load the corpus, train (or take) the tokenizer and encode ``splits``.

    Rank 0 trains the tokenizer and fills the id cache first; the other ranks then read the
    cache instead of repeating the work.
    """
    corpus = load_corpus(data.dataset, data_dir if data_dir is not None else data.data_dir,
                         data.max_train_rows, data.max_val_rows, use_hub=data.use_hub)
    for split in splits:
        if split not in corpus.splits:
            raise ValueError(f"corpus {data.dataset!r} has no {split!r} split; it has "
                             f"{sorted(corpus.splits)}")
    result: RunData | None = None
    for turn in ((0,), range(1, ctx.world_size)):
        if ctx.rank in turn:
            tk = tokenizer
            if tk is None:
                tk = train_tokenizer(corpus, kind=tok.kind, vocab_size=tok.vocab_size,
                                     on_all_splits=tok.on_all_splits, cache_dir=cache_dir)
            ids = encode_corpus(corpus, tk, cache_dir=cache_dir, splits=list(splits))
            result = RunData(corpus, tk, ids)
        ctx.barrier()
    assert result is not None
    return result


def load_tokenizer_file(path: str | os.PathLike[str]) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise CheckpointError(f"tokenizer file {path} is truncated or corrupted ({e})") from e
