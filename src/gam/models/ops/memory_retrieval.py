"""Retrieval from a learned memory bank, GAM's global path: softmax(h M^T) M per token.

``memory_retrieval`` is the training path (``fused``: matmuls with a backward that recomputes
the scores; ``sdpa``; ``naive``), ``memory_retrieval_reference`` the paper's formula that keeps
the (B, T, S) weights, to test against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gam.runtime import autocast_dtype

RETRIEVAL_IMPLS = ("fused", "sdpa", "naive")


# Rows (tokens) per chunk in the fused retrieval: bounds its transient (rows, slots) buffers.
_RETRIEVAL_CHUNK = 8192


class _FusedRetrieval(torch.autograd.Function):
    """softmax(h M^T) M that saves only h and M for backward and recomputes the scores
    there: the flash-attention trick with plain matmuls. The softmax runs in fp32 (one
    ``softmax(..., dtype=float32)`` call reading the bf16 scores under autocast).

    Backward, with P = softmax(S), O = P M, D = rowsum(dO * O) = rowsum(dP * P):
        dP = dO M^T,   dS = P * (dP - D),   dh = dS M,   dM = dS^T h + P^T dO.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax never below fp32
        out = torch.empty_like(h)  # (N, C)
        for i in range(0, h.shape[0], _RETRIEVAL_CHUNK):
            rows = slice(i, i + _RETRIEVAL_CHUNK)
            p = torch.softmax(h[rows] @ memory.T, dim=-1, dtype=acc)  # (n, S)
            torch.mm(p.to(h.dtype), memory, out=out[rows])
        ctx.save_for_backward(h, memory)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, memory = ctx.saved_tensors
        acc = torch.promote_types(h.dtype, torch.float32)
        grad_out = grad_out.to(h.dtype)
        grad_h = torch.empty_like(h)
        grad_m = torch.zeros(memory.shape, dtype=acc, device=memory.device)
        for i in range(0, h.shape[0], _RETRIEVAL_CHUNK):
            rows = slice(i, i + _RETRIEVAL_CHUNK)
            p = torch.softmax(h[rows] @ memory.T, dim=-1, dtype=acc)  # (n, S)
            dp = (grad_out[rows] @ memory.T).to(acc)  # (n, S)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            ds, p = ds.to(h.dtype), p.to(h.dtype)
            torch.mm(ds, memory, out=grad_h[rows])
            grad_m.add_(ds.T @ h[rows]).add_(p.T @ grad_out[rows])
        return grad_h, grad_m.to(memory.dtype)


def memory_retrieval(h: torch.Tensor, memory: torch.Tensor, impl: str = "fused"
                     ) -> torch.Tensor:
    """softmax(h @ M^T) @ M without keeping the (B, T, S) scores for backward.

    h (B, T, C), M (S, C). ``fused`` (default): matmuls plus a recomputing backward, fastest on
    CPU (measured in docs/results.md: PyTorch's CPU flash-attention backward is several times
    slower at head dim 512). ``sdpa``: every token is one query of a single attention head
    whose keys and values are the slots, run by ``scaled_dot_product_attention``.
    ``naive``: the paper's formula (keeps the scores).
    """
    B, T, C = h.shape
    if impl == "fused":
        # A custom Function's backward runs outside autocast: cast up front so that both
        # passes run their matmuls in the autocast dtype.
        dtype = autocast_dtype(h)
        return _FusedRetrieval.apply(h.reshape(B * T, C).to(dtype), memory.to(dtype)
                                     ).view(B, T, C)
    if impl == "sdpa":
        q = h.reshape(1, 1, B * T, C)  # (1, 1, B*T, C)
        kv = memory.to(h.dtype)[None, None]  # (1, 1, S, C)
        return F.scaled_dot_product_attention(q, kv, kv, scale=1.0).view(B, T, C)
    if impl == "naive":
        return memory_retrieval_reference(h, memory)
    raise ValueError(f"retrieval must be one of {RETRIEVAL_IMPLS}, got {impl!r}")


def memory_retrieval_reference(h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The paper's formula, materialising the (B, T, S) weights."""
    weights = F.softmax(h @ memory.T, dim=-1)  # (B, T, S)
    return weights @ memory  # (B, T, C)


def memory_bank_flops(memory_bank: torch.Tensor | None) -> float:
    """Forward FLOPs per token of a retrieval from an (S, C) bank: 2 x 2*S*C."""
    if memory_bank is None:
        return 0.0
    slots, dim = memory_bank.shape
    return 2 * 2.0 * slots * dim
