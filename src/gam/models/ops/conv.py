"""Short causal depthwise convolutions over time, the local mixing of GAM, Mamba and the
delta-rule families.

- ``causal_depthwise_conv``: the PyTorch form (left padding, ``conv1d`` with groups), the
  reference and the path on every device;
- ``causal_conv_silu``: silu(causal conv). On CPU a compiled kernel (``_scan_cpp``) that reads
  its input in place and recomputes in backward, computing in float32 and returning the input's
  dtype; elsewhere ``silu(causal_depthwise_conv(...))``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gam.models.ops import _scan_cpp


def causal_depthwise_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                          ) -> torch.Tensor:
    """Depthwise causal conv over time: h (B, T, C), weight (C, 1, k) -> (B, T, C).
    Output t sees inputs t-k+1..t (zeros before the start)."""
    k = weight.shape[-1]
    y = F.conv1d(F.pad(h.transpose(1, 2), (k - 1, 0)), weight, bias, groups=h.shape[-1])
    return y.transpose(1, 2)  # (B, T, C)


# The compiled CPU kernel as torch custom ops (opaque to torch.compile, with fake
# implementations for tracing), differentiated by its hand-written backward kernel.
@torch.library.custom_op("gam::causal_conv_silu_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _scan_cpp.conv_forward(x, weight, bias, silu=True)


@_conv_fwd_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "gam::causal_conv_silu_bwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, Tensor dout) -> (Tensor, Tensor, Tensor)")
def _conv_bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _scan_cpp.conv_backward(x, weight, bias, dout, silu=True)
    return dx, dw.contiguous(), db


@_conv_bwd_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _conv_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)  # x is kept, not the output: backward recomputes the conv


def _conv_backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _conv_bwd_op(*ctx.saved_tensors, dout)


_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv1d over time): x (B, T, E), weight (E, 1, K), bias (E,).
    On CPU the compiled kernel (computing in float32, returning x's dtype), elsewhere
    PyTorch's conv1d."""
    if x.device.type == "cpu" and _scan_cpp.load() is not None:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type="cpu", enabled=False):
            out = _conv_fwd_op(x.to(dtype), weight.to(dtype), bias.to(dtype))
        return out.to(x.dtype)
    return F.silu(causal_depthwise_conv(x, weight, bias))
