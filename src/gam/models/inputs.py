"""The checks of what a model is given: token ids (rank, dtype, range, length) and training
targets. On a device where reading a value back would stall the stream, the range checks run
on the device (``torch._assert_async``) instead."""

from __future__ import annotations

import torch

from gam.constants import IGNORE_INDEX
from gam.runtime import host_sync_is_cheap


def check_token_ids(idx: torch.Tensor, vocab_size: int, max_seq_len: int, start_pos: int = 0
                    ) -> None:
    """Raise ValueError for ids a model of ``vocab_size`` and ``max_seq_len`` cannot take at
    position ``start_pos`` (rank, dtype, range, length)."""
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must hold integer token ids (torch.long), got dtype {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, seq_len), got shape {tuple(idx.shape)}")
    if idx.shape[0] < 1:
        raise ValueError("idx must hold at least one sequence, got a batch of 0 (shape "
                         f"{tuple(idx.shape)})")
    if idx.shape[1] < 1:
        raise ValueError("idx must hold at least one token per row, got seq_len 0")
    end = start_pos + idx.shape[1]
    if end > max_seq_len:
        raise ValueError(
            f"sequence length {end} exceeds max_seq_len {max_seq_len}; build the "
            f"model with a larger max_seq_len (e.g. build_model(..., max_seq_len={end}))")
    if torch.compiler.is_compiling():
        return
    if not host_sync_is_cheap(idx.device):  # checked on the device, without waiting
        torch._assert_async(((idx >= 0) & (idx < vocab_size)).all(),
                            f"a token id is outside [0, {vocab_size})")
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside [0, {vocab_size}) "
                         f"(vocab_size {vocab_size})")


def check_target_ids(idx: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError for targets not shaped as ``idx`` or outside ``[0, vocab_size)`` and
    not ``IGNORE_INDEX``."""
    if targets.shape != idx.shape:
        raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, "
                         f"got {tuple(targets.shape)}")
    if torch.compiler.is_compiling():
        return
    if not host_sync_is_cheap(targets.device):
        ok = ((targets >= 0) & (targets < vocab_size)) | (targets == IGNORE_INDEX)
        torch._assert_async(ok.all(), f"a target id is outside [0, "
                            f"{vocab_size}) and not {IGNORE_INDEX}")
        return
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise ValueError(f"target ids must be in [0, {vocab_size}) or "
                         f"{IGNORE_INDEX} (ignored)")
