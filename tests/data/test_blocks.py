"""TokenBlocks: shapes, shift by one, non-overlapping targets, padded evaluation tail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gam.data import IGNORE_INDEX, TokenBlocks


def all_targets(blocks: TokenBlocks) -> np.ndarray:
    ys = np.concatenate([blocks[i][1].numpy() for i in range(len(blocks))])
    return ys[ys != IGNORE_INDEX]


def test_training_blocks_are_full_and_shifted():
    ids = np.arange(100, 123, dtype=np.uint16)  # 23 ids -> 22 targets -> 4 full blocks of 5
    blocks = TokenBlocks(ids, block_size=5)
    assert len(blocks) == 4 and blocks.num_targets == 20
    for i in range(len(blocks)):
        x, y = blocks[i]
        assert x.dtype == torch.long and y.dtype == torch.long
        assert x.shape == y.shape == (5,)
        assert torch.equal(x, torch.arange(100 + 5 * i, 105 + 5 * i))
        assert torch.equal(y, x + 1)
    # targets never overlap: block i ends where block i+1 starts predicting
    assert np.array_equal(all_targets(blocks), np.arange(101, 121))


def test_eval_blocks_cover_every_target_exactly_once_with_padding():
    ids = np.arange(100, 123, dtype=np.uint16)
    blocks = TokenBlocks(ids, block_size=5, drop_last=False)
    assert len(blocks) == 5
    x, y = blocks[4]
    assert x.tolist() == [120, 121, 0, 0, 0]
    assert y.tolist() == [121, 122, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert blocks.num_targets == len(ids) - 1
    assert np.array_equal(all_targets(blocks), ids[1:].astype(np.int64))
    assert blocks[-1][1].tolist() == y.tolist()


@pytest.mark.parametrize("n,block_size", [(21, 5), (2, 1), (2, 7), (1000, 64), (130, 129)])
def test_eval_target_count_equals_len_minus_one(n, block_size):
    ids = np.random.default_rng(n).integers(0, 500, size=n)
    blocks = TokenBlocks(ids, block_size, drop_last=False)
    ys = np.concatenate([blocks[i][1].numpy() for i in range(len(blocks))])
    assert (ys != IGNORE_INDEX).sum() == blocks.num_targets == n - 1
    assert np.array_equal(ys[ys != IGNORE_INDEX], ids[1:])


def test_exact_multiple_has_no_padding():
    blocks = TokenBlocks(list(range(21)), block_size=5, drop_last=False)
    assert len(blocks) == 4
    assert IGNORE_INDEX not in torch.stack([blocks[i][1] for i in range(4)])


def test_stream_shorter_than_one_block_is_an_error():
    with pytest.raises(ValueError, match="length 5 .*block_size=5 needs at least 6"):
        TokenBlocks(np.arange(5), block_size=5)
    assert len(TokenBlocks(np.arange(6), block_size=5)) == 1
    assert len(TokenBlocks(np.arange(5), block_size=5, drop_last=False)) == 1
    with pytest.raises(ValueError, match="no targets"):
        TokenBlocks(np.arange(1), block_size=5, drop_last=False)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        TokenBlocks(np.arange(10), block_size=bad)


def test_bad_ids():
    with pytest.raises(ValueError, match="1-D"):
        TokenBlocks(np.zeros((3, 4), dtype=np.int64), block_size=2)
    with pytest.raises(ValueError, match="integers"):
        TokenBlocks(np.zeros(10, dtype=np.float32), block_size=2)


def test_index_out_of_range():
    blocks = TokenBlocks(np.arange(11), block_size=5)
    with pytest.raises(IndexError):
        blocks[2]
    with pytest.raises(IndexError):
        blocks[-3]


def test_memmap_and_tensor_inputs_batch_in_a_dataloader(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(1, 42, dtype=np.uint16))
    memmapped = np.load(path, mmap_mode="r")
    for ids in (memmapped, torch.arange(1, 42)):
        loader = DataLoader(TokenBlocks(ids, block_size=8), batch_size=3)
        x, y = next(iter(loader))
        assert x.shape == y.shape == (3, 8)
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert x[1, 0].item() == 9
