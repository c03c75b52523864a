"""Element-wise work of the blocks done in fewer passes over memory, same math.

On a CPU a training step of the paper-size models spends a third of its time outside the
matmuls (docs/results.md, profile of the bf16 step), in passes over (B, T, C) activations.
Each function here has a plain reference next to it that the tests compare against:

- ``dropout_add(y, p, training, residual)``: ``residual + F.dropout(y, p)``. On CPU, PyTorch's
  dropout draws one ``bernoulli_`` sample per element (about 5 ms for 1M elements, one
  thread); here the keep mask comes from 32-bit random words compared with
  ``round(p * 2**32)`` (drop probability exact to 2**-32, finer than ``bernoulli_``'s float
  uniforms) and is applied with the residual add in one ``addcmul``: about 3 ms, and the
  backward is one multiplication by the saved (scaled) mask.
- ``gated_residual(x, gate_logits, paths)``: ``x + sum_i sigmoid(g_i) * path_i`` (the GAM
  fusion) as one autograd node: one sigmoid, one ``addcmul`` per path, and a backward that
  writes the gate gradients in place instead of concatenating them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_WORD_BITS = 32


def _use_fast_dropout(y: torch.Tensor) -> bool:
    # CUDA's dropout kernel is already fused; torch.compile fuses F.dropout itself.
    return y.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``keep / (1 - p)`` with ``keep`` ~ Bernoulli(1 - p), drawn from the default generator
    (``torch.manual_seed`` makes it reproducible) as 32-bit words: an element is dropped when
    its word, read as an unsigned integer, is below ``round(p * 2**32)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    numel = 1
    for s in shape:
        numel *= int(s)
    # int64 words of 64 random bits (random_ with from=-2**63 and no upper bound draws the full
    # range), viewed as twice as many 32-bit words: half the generator calls of int32 draws.
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)
    words = words.view(torch.int32)[:numel].view(shape)
    threshold = -(2 ** (_WORD_BITS - 1)) + round(p * 2**_WORD_BITS)  # signed view of the cut
    keep_value = torch.tensor(1.0 / (1.0 - p), dtype=dtype, device=device)
    return torch.where(words >= threshold, keep_value, torch.zeros((), dtype=dtype,
                                                                   device=device))


def dropout_add(y: torch.Tensor, p: float, training: bool,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.dropout(y, p, training)`` (``residual`` None: just the dropout)."""
    if not training or p == 0.0:
        return y if residual is None else residual + y
    if not _use_fast_dropout(y):
        y = F.dropout(y, p, True)
        return y if residual is None else residual + y
    mask = dropout_mask(y.shape, p, y.dtype, y.device)  # (..., C), 0 or 1/(1-p)
    if residual is None:
        return y * mask
    return torch.addcmul(residual, y, mask)


def dropout_add_reference(y: torch.Tensor, p: float, training: bool,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    y = F.dropout(y, p, training)
    return y if residual is None else residual + y


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout_add``; ``forward(y, residual)`` adds the residual in the
    same pass. No parameters: checkpoints are those of ``nn.Dropout``."""

    def forward(self, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return dropout_add(y, self.p, self.training, residual)


class _GatedResidual(torch.autograd.Function):
    """x + sum_i s_i * path_i with s = sigmoid(gate_logits), split in len(paths) along C.

    Saves s and the paths. Backward: dx = dy, dpath_i = dy * s_i,
    dg_i = dy * path_i * s_i * (1 - s_i), the last written straight into one (..., n*C) buffer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_logits: torch.Tensor, *paths: torch.Tensor
                ) -> torch.Tensor:
        s = torch.sigmoid(gate_logits)  # (..., n*C)
        gates = s.chunk(len(paths), dim=-1)
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(s.dtype, paths[0].dtype))
        out = torch.addcmul(x.to(out_dtype), gates[0], paths[0])  # (..., C)
        for g, path in zip(gates[1:], paths[1:], strict=True):
            out.addcmul_(g, path)
        ctx.save_for_backward(s, *paths)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        s, *paths = ctx.saved_tensors
        n = len(paths)
        gates = s.chunk(n, dim=-1)
        grad_paths = [grad_out * g for g in gates]
        # in s's dtype, as autograd's own mul backward would produce the gate gradient
        grad_s = torch.empty_like(s)
        for part, path in zip(grad_s.chunk(n, dim=-1), paths, strict=True):
            torch.mul(grad_out, path, out=part)
        grad_gate = torch.ops.aten.sigmoid_backward(grad_s, s)
        return grad_out.to(ctx.x_dtype), grad_gate, *grad_paths


def gated_residual(x: torch.Tensor, gate_logits: torch.Tensor, paths: list[torch.Tensor]
                   ) -> torch.Tensor:
    """``x + sum_i sigmoid(g_i) * paths[i]`` where ``gate_logits`` (..., n*C) splits into the
    n gates g_i (..., C) of the n ``paths`` (..., C)."""
    if gate_logits.shape[-1] != len(paths) * x.shape[-1]:
        raise ValueError(f"gate_logits must have {len(paths)} x {x.shape[-1]} features for "
                         f"{len(paths)} paths, got {gate_logits.shape[-1]}")
    if torch.compiler.is_compiling():  # inductor fuses the plain formula itself
        return gated_residual_reference(x, gate_logits, paths)
    return _GatedResidual.apply(x, gate_logits, *paths)


def gated_residual_reference(x: torch.Tensor, gate_logits: torch.Tensor,
                             paths: list[torch.Tensor]) -> torch.Tensor:
    gates = torch.sigmoid(gate_logits).chunk(len(paths), dim=-1)
    out = x
    for g, path in zip(gates, paths, strict=True):
        out = out + g * path
    return out
