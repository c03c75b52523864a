"""What the GAM gates do: per-layer statistics of sigmoid(g_local) and sigmoid(g_global).

A GAM block computes ``g = gate(LayerNorm(x))`` with ``gate = Linear(C, n_paths * C)`` and fuses
its paths as ``sigmoid(g_local) * local + sigmoid(g_global) * global`` (``g`` chunked into the
paths in the order local, global). ``gate_statistics`` hooks every block's ``gate`` Linear, runs
the model on some batches and reports, per layer and path, the mean and standard deviation of
the sigmoid gate values over all tokens and channels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from gam.models.blocks import block_gate_paths
from gam.training.distributed import unwrap_model


def gate_paths(block: nn.Module) -> list[str]:
    """Names of the gated paths of a block, in the order of its gate's output chunks (the
    block's ``gate_paths()``, the family interface of ``gam.models.lm``)."""
    return block_gate_paths(block)


def gated_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(layer index, block)`` of every block with a ``gate`` Linear (GAM with gating)."""
    base = unwrap_model(model)
    out = []
    for i, block in enumerate(getattr(base, "blocks", [])):
        if isinstance(getattr(block, "gate", None), nn.Linear) and gate_paths(block):
            out.append((i, block))
    return out


def has_gates(model: nn.Module) -> bool:
    return bool(gated_blocks(model))


@torch.no_grad()
def gate_statistics(model: nn.Module, batches: Iterable[Any],
                    max_batches: int | None = None) -> list[dict[str, float]]:
    """Per-layer gate statistics over ``batches``.

    Args:
        model: a GAM language model (DDP / compiled wrappers are unwrapped). Models without
            gates give ``[]``.
        batches: token-id tensors (B, T), or ``(x, y)`` pairs as a DataLoader over
            ``TokenBlocks`` yields (only ``x`` is used).
        max_batches: stop after this many batches.

    Returns:
        ``[{"layer": i, "local_mean", "local_std", "global_mean", "global_std", "tokens"}, ...]``
        (only the paths the block has), in layer order. Statistics are over every position and
        channel of the inputs (population std).
    """
    base = unwrap_model(model)
    blocks = gated_blocks(base)
    if not blocks:
        return []
    acc: dict[int, dict[str, list[float]]] = {}
    tokens: dict[int, int] = {}
    handles = []

    def make_hook(layer: int, paths: list[str]):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            gates = torch.sigmoid(output.detach().double()).chunk(len(paths), dim=-1)
            tokens[layer] = tokens.get(layer, 0) + output[..., 0].numel()
            for name, g in zip(paths, gates, strict=True):
                s = acc[layer].setdefault(name, [0.0, 0.0, 0.0])
                s[0] += float(g.sum())
                s[1] += float((g * g).sum())
                s[2] += g.numel()
        return hook

    for layer, block in blocks:
        acc[layer] = {}
        handles.append(block.gate.register_forward_hook(make_hook(layer, gate_paths(block))))
    was_training = base.training
    base.eval()
    device = next(base.parameters()).device
    try:
        for n, batch in enumerate(batches):
            if max_batches is not None and n >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if hasattr(base, "hidden_states"):
                base.hidden_states(x.to(device))  # the blocks only: no vocabulary head
            else:
                base(x.to(device))
    finally:
        for h in handles:
            h.remove()
        base.train(was_training)
    result = []
    for layer, _ in blocks:
        row: dict[str, float] = {"layer": layer}
        for name, (s, sq, count) in acc[layer].items():
            if count == 0:
                continue
            mean = s / count
            row[f"{name}_mean"] = mean
            row[f"{name}_std"] = math.sqrt(max(sq / count - mean * mean, 0.0))
        row["tokens"] = tokens.get(layer, 0)
        result.append(row)
    return result
