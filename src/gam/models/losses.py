"""Cross-entropy through the vocabulary head without materialising all the logits.

At the paper's sizes the head's logits are the largest activation of the model (B*T x 10000
floats, plus their float32 copy and log-softmax for the loss). ``linear_cross_entropy``
computes the loss chunk by chunk and, when gradients are needed, the gradients of the hidden
states and of the head weight during the forward pass (as Liger-Kernel's fused linear
cross-entropy does), so only one chunk of logits exists at a time. Same math as
``F.cross_entropy(x @ W.T, targets, ignore_index=-100)``.
"""

from __future__ import annotations

import torch

from gam.models.gam import autocast_dtype
from gam.models.lm import IGNORE_INDEX

# 256 rows x 10000 vocab stays cache-friendly: measured ~1.8x faster than 1024 rows on CPU.
DEFAULT_CHUNK_ROWS = 256


def _chunk_loss_and_grad(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int, need_grad: bool, scale: float | torch.Tensor):
    acc = torch.promote_types(x.dtype, torch.float32)
    logits = (x @ weight.T).to(acc)  # (n, V); autocast makes the matmul bf16 when enabled
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    valid = targets != ignore_index
    safe = targets.clamp(min=0)
    target_logit = logits.gather(1, safe[:, None])[:, 0]
    loss_sum = ((lse - target_logit) * valid).sum()
    if not need_grad:
        return loss_sum, None
    grad = torch.exp(logits - lse[:, None])  # softmax, (n, V)
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    grad *= (valid.to(grad.dtype) * scale)[:, None]
    return loss_sum, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, chunk_rows):
        n_valid = (targets != ignore_index).sum()
        acc = torch.promote_types(x.dtype, torch.float32)
        scale = 1.0 / n_valid.to(acc) if reduction == "mean" else 1.0
        loss = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for i in range(0, x.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            loss_sum, g = _chunk_loss_and_grad(x[rows], weight, targets[rows], ignore_index,
                                               True, scale)
            loss += loss_sum
            g = g.to(x.dtype)
            grad_x[rows] = g @ weight
            grad_w += (g.T @ x[rows]).to(acc)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss * scale if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), \
            None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Cross-entropy of ``x @ weight.T`` against ``targets``: x (N, C), weight (V, C),
    targets (N,). ``reduction`` is ``"mean"`` over non-ignored targets or ``"sum"``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if x.dim() != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"expected x (N, C) and targets (N,), got {tuple(x.shape)} and "
                         f"{tuple(targets.shape)}")
    # A custom Function's backward runs outside autocast: cast up front instead.
    dtype = autocast_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction,
                                         chunk_rows)
    loss = torch.zeros((), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for i in range(0, x.shape[0], chunk_rows):
        rows = slice(i, i + chunk_rows)
        loss += _chunk_loss_and_grad(x[rows], weight, targets[rows], ignore_index, False, 1.0)[0]
    if reduction == "mean":
        return loss / (targets != ignore_index).sum()
    return loss
