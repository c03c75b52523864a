"""What the families' blocks share: the norms (``make_norm``), the feed-forward layers
(``FeedForward``, ``SwiGLU``) and the defaults of the optional block methods that the tools
reporting on a model call (``block_gate_paths``, ``block_mixing_flops``,
``block_decode_state_bytes``; the block interface is described in :mod:`gam.models.lm`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.ops.fused import Dropout

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, d_model: int) -> nn.Module:
    """A norm over the last dimension: ``"layernorm"`` (weight and bias, eps 1e-5) or
    ``"rmsnorm"`` (weight only, eps 1e-6, as Llama)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=1e-6)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class FeedForward(nn.Module):
    """d -> ffn_mult * d -> GELU -> d -> dropout, as in the paper's blocks."""

    def __init__(self, d_model: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_mult * d_model)
        self.fc2 = nn.Linear(ffn_mult * d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """FFN(x), or ``residual + FFN(x)`` with the add fused into the dropout."""
        return self.dropout(self.fc2(F.gelu(self.fc1(x))), residual)  # (..., C)


class SwiGLU(nn.Module):
    """W2(silu(W1 x) * W3 x) -> dropout, no biases (Llama's MLP; names w1 gate, w3 up, w2
    down), for the Llama-style families."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MLP(x), or ``residual + MLP(x)`` with the add fused into the dropout."""
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), residual)  # (..., C)


def state_nbytes(state: Any) -> int:
    """Bytes of every tensor in a decode state (a tensor, or tuples / lists / dicts / objects
    such as ``DecodeCache`` holding them)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_nbytes(v) for v in state)
    if hasattr(state, "__dict__"):
        return sum(state_nbytes(v) for v in vars(state).values())
    return 0


def block_gate_paths(block: nn.Module) -> list[str]:
    """``block.gate_paths()``, or [] for a block without gates."""
    paths = getattr(block, "gate_paths", None)
    return list(paths()) if callable(paths) else []


def block_mixing_flops(block: nn.Module, seq_len: int, causal_halved: bool = False
                       ) -> dict[str, float]:
    """``block.mixing_flops(...)`` by kind, or {} for a block whose work is all Linear /
    Conv1d."""
    flops = getattr(block, "mixing_flops", None)
    if not callable(flops):
        return {}
    return {kind: float(v) for kind, v in flops(seq_len, causal_halved).items() if v}


def block_decode_state_bytes(block: nn.Module, state: Any) -> int:
    """``block.decode_state_bytes(state)``, or every tensor of the state."""
    used = getattr(block, "decode_state_bytes", None)
    return int(used(state)) if callable(used) else state_nbytes(state)
