"""How the wrapper runs a family's blocks over padded batches and on from a cached state.

``attention_mask`` zeros mark padding. The GAM families (blocks with
``extend(x, state, pad_mask)``) zero the normalised conv inputs of padded tokens in every block,
exactly the zero padding a row alone sees before its start; for every other family the rows of
each left-padding length run together without their padding (``rows_by_lead``; one decode state
per group in the cache). Left-padded batches therefore give each row the output of its prompt
alone, in every family. Right padding is fine without a cache (the models are causal); a cache
that ends in padding cannot be continued, nor can padding sit between a row's real tokens
(``row_layout`` refuses both).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from gam.models.lm import CausalLM


def masks_padding(block: nn.Module) -> bool:
    """Whether the block's ``extend`` takes a ``pad_mask`` (GAMBlock's protocol): it then runs
    left-padded rows in one batch by itself."""
    extend = getattr(block, "extend", None)
    return callable(extend) and "pad_mask" in inspect.signature(extend).parameters


def plain_stack(lm: CausalLM) -> bool:
    """Whether the blocks only hand each other the residual stream (the shell's own block
    passes): then the wrapper may run them one by one (checkpointing, hidden states)."""
    return all(getattr(type(lm), name) is getattr(CausalLM, name)
               for name in ("forward_blocks", "prefill_blocks", "step_blocks"))


def block_pass(block: nn.Module, x: torch.Tensor, state: Any, pad_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, Any]:
    """Run ``block`` on T new tokens x (B, T, C) that follow ``state`` (None = the start):
    prefill, one step, ``extend`` (chunked continuation; with ``pad_mask`` (B, T) False at
    padding, the GAM families' masking) or one step per token."""
    if pad_mask is None and state is None:
        return block.prefill(x)
    if pad_mask is None and x.shape[1] == 1:
        y, state = block.step(x[:, 0], state)
        return y[:, None], state
    if pad_mask is not None or hasattr(block, "extend"):
        return block_extend(block, x, state, pad_mask)
    ys = []
    for t in range(x.shape[1]):
        y, state = block.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def block_extend(block: nn.Module, x: torch.Tensor, state: Any,
                 pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """``block.extend``: T new tokens after ``state``, padded tokens (``pad_mask`` False)
    masked (only passed when given: a family's extend may not take it)."""
    if pad_mask is None:
        return block.extend(x, state)
    return block.extend(x, state, pad_mask)


def masked_forward(block: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    return block_extend(block, x, None, pad_mask)[0]


def row_layout(current: torch.Tensor | None, started: torch.Tensor | None, B: int, T: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's leading padding (B,) and whether it ends in padding (B,) (right padding:
    its state cannot be continued). A row's real tokens must be one run (padding between real
    tokens, or before the new tokens of a row that has real tokens in the cache, is refused:
    no family could give the row what it gives alone)."""
    if current is None:
        return torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool)
    mask = current.cpu()
    if started is not None:  # real tokens in the cache count as a run that started before
        before = started.cpu()[:, None]
    else:
        before = torch.zeros(B, 1, dtype=torch.bool)
    runs = (mask & ~torch.cat([before, mask[:, :-1]], dim=1)).sum(dim=1)
    bad = (runs > 1) | ((runs == 1) & before[:, 0])
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens (or before "
                         f"the new tokens of a row the cache has tokens of): gam models take "
                         f"padding before a row's tokens (left) or after them (right) only")
    lead = torch.where(mask.any(dim=1), mask.long().argmax(dim=1), torch.full((B,), T))
    seen = (mask.long().cumsum(dim=1) > 0) | before
    closed = (seen & ~mask).any(dim=1)
    return lead, closed


def scatter_rows(out: torch.Tensor, rows: torch.Tensor, lead: int, values: torch.Tensor
                 ) -> torch.Tensor:
    """``out`` with ``values`` (b, T - lead, C) written at rows ``rows``, positions lead..T-1
    (out of place, so gradients flow)."""
    positions = torch.arange(lead, out.shape[1], device=out.device)
    return out.index_put((rows.to(out.device)[:, None], positions[None, :]), values)



def rows_by_lead(lead: torch.Tensor, T: int, rows: torch.Tensor | None = None
                 ) -> list[tuple[int, torch.Tensor]]:
    """The rows (of ``rows``, default all) grouped by their leading padding: (start, rows) for
    every start < T (rows that are all padding are left out)."""
    rows = torch.arange(len(lead)) if rows is None else rows
    starts = lead[rows]
    return [(int(start), rows[starts == start]) for start in torch.unique(starts)
            if int(start) < T]

