"""Fixed-length (input, target) blocks over a flat token stream, for next-token prediction.

Layout: block ``i`` reads ``ids[i*B : i*B + B + 1]``; its input ``x`` is the first ``B`` ids
and its target ``y`` the last ``B`` (``x`` shifted by one). Consecutive blocks share one id
(the last target of block ``i`` is the first input of block ``i+1``), so targets never overlap
and never skip: token ``t`` (for ``t >= 1``) is the target of exactly one block position.

* ``drop_last=True`` (training): only full blocks; the tail shorter than a block is unused.
* ``drop_last=False`` (evaluation): the final partial block is kept, ``x`` padded with 0 and
  ``y`` with ``IGNORE_INDEX`` (-100, ignored by ``cross_entropy``), so the mean loss over all
  blocks is exactly the loss over every token of the split but the first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from gam.constants import IGNORE_INDEX

"""Target value of padding positions (``torch.nn.functional.cross_entropy``'s default)."""

INPUT_PAD_ID = 0
"""Input id at padding positions (any valid id works: their targets are ignored)."""


class TokenBlocks(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping next-token blocks over a 1-D id stream (see the module docstring).

    Args:
        ids: flat token ids (numpy array or memmap, tensor, or sequence of ints). A memmap stays
            on disk; only the requested slices are read.
        block_size: number of positions per block (the model's context length).
        drop_last: keep only full blocks (training) or also the padded tail (evaluation).
    """

    def __init__(
        self,
        ids: np.ndarray | torch.Tensor | Sequence[int],
        block_size: int,
        drop_last: bool = True,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        elif not isinstance(ids, np.ndarray):
            ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        self.ids = ids
        self.block_size = block_size
        self.drop_last = drop_last
        n_targets = max(len(ids) - 1, 0)
        if drop_last:
            self._len = n_targets // block_size
            if self._len == 0:
                raise ValueError(
                    f"token stream of length {len(ids)} is shorter than one block: "
                    f"block_size={block_size} needs at least {block_size + 1} tokens "
                    "(use a smaller block_size, more text, or drop_last=False)"
                )
        else:
            self._len = -(-n_targets // block_size)  # ceil
            if self._len == 0:
                raise ValueError(
                    f"token stream of length {len(ids)} has no targets: need at least 2 tokens"
                )

    def __len__(self) -> int:
        return self._len

    @property
    def num_targets(self) -> int:
        """Number of real (non-padding) target positions over all blocks."""
        if self.drop_last:
            return self._len * self.block_size
        return len(self.ids) - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"block index out of range: {index} (dataset has {self._len})")
        start = index * self.block_size
        chunk = np.asarray(self.ids[start : start + self.block_size + 1], dtype=np.int64)
        x = torch.from_numpy(chunk[:-1].copy())
        y = torch.from_numpy(chunk[1:].copy())
        short = self.block_size - len(y)
        if short > 0:  # final partial block (drop_last=False only)
            x = torch.cat([x, x.new_full((short,), INPUT_PAD_ID)])
            y = torch.cat([y, y.new_full((short,), IGNORE_INDEX)])
        return x, y
