"""Short causal depthwise convolutions over time, the local mixing of GAM, Mamba and the
delta-rule families.

- ``causal_depthwise_conv``: the PyTorch form (left padding, ``conv1d`` with groups), the
  reference and the path on every device (under autocast it computes in the autocast dtype, as
  ``conv1d`` does); on CUDA causal-conv1d's ``causal_conv1d_fn`` when installed (``kernels``);
- ``causal_conv_silu``: silu(causal conv), computed in float32 (float64 for float64 inputs)
  with autocast off and returned in the input's dtype, whatever the path: on CPU a compiled
  kernel (``_scan_cpp``) that reads its input in place and recomputes in backward, on CUDA
  ``causal_conv1d_fn`` when installed, else ``silu(causal_depthwise_conv(...))``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gam.models.ops import _scan_cpp, kernels
from gam.runtime import autocast_dtype


def _causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   silu: bool) -> torch.Tensor:
    """causal-conv1d's kernel on x (B, T, C) in x's dtype (weight and bias cast to it, as the
    kernel wants): its layout is channels first, (B, C, T); a (B, T, C) tensor transposed is
    its channel-last layout, which it takes when C and the strides are multiples of 8."""
    x = x.contiguous()
    xt = x.transpose(1, 2)  # (B, C, T), channel-last in memory
    if x.shape[-1] % 8:
        xt = xt.contiguous()  # channels first
    fn = kernels.fast_kernel("causal_conv1d").causal_conv1d_fn
    out = fn(xt, weight.reshape(weight.shape[0], weight.shape[-1]).to(x.dtype),
             None if bias is None else bias.to(x.dtype), activation="silu" if silu else None)
    return out.transpose(1, 2)  # (B, T, C)


def causal_depthwise_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                          ) -> torch.Tensor:
    """Depthwise causal conv over time: h (B, T, C), weight (C, 1, k) -> (B, T, C).
    Output t sees inputs t-k+1..t (zeros before the start)."""
    k = weight.shape[-1]
    dtype = autocast_dtype(h)
    if kernels.choose("causal_conv", h.device.type, dtype, width=k) == "causal_conv1d":
        with torch.autocast(device_type=h.device.type, enabled=False):
            out = kernels.attempt("causal_conv1d",
                                  lambda: _causal_conv1d(h.to(dtype), weight, bias, silu=False))
        if out is not None:
            return out
    return _conv1d(h, weight, bias)


def _conv1d(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = weight.shape[-1]
    y = F.conv1d(F.pad(h.transpose(1, 2), (k - 1, 0)), weight, bias, groups=h.shape[-1])
    return y.transpose(1, 2)  # (B, T, C)


# The compiled CPU kernel as torch custom ops (opaque to torch.compile, with fake
# implementations for tracing), differentiated by its hand-written backward kernel.
@torch.library.custom_op("gam::causal_conv_silu_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    kernels.require_cpu("causal_conv_silu's kernel", x, weight, bias)
    return _scan_cpp.conv_forward(x, weight, bias, silu=True)


@_conv_fwd_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "gam::causal_conv_silu_bwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, Tensor dout) -> (Tensor, Tensor, Tensor)")
def _conv_bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels.require_cpu("causal_conv_silu's kernel", x, weight, bias, dout)
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
    """silu(causal depthwise conv1d over time): x (B, T, E), weight (E, 1, K), bias (E,),
    computed in float32 (float64 for float64 x) with autocast off on every path, returned in
    x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    choice = kernels.choose("causal_conv_silu", x.device.type, dtype, width=weight.shape[-1])
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_, w_, b_ = x.to(dtype), weight.to(dtype), bias.to(dtype)
        if choice == "cpp":
            return _conv_fwd_op(x_, w_, b_).to(x.dtype)
        out = None
        if choice == "causal_conv1d":
            out = kernels.attempt("causal_conv1d", lambda: _causal_conv1d(x_, w_, b_, silu=True))
        if out is None:
            out = F.silu(_conv1d(x_, w_, b_))
        return out.to(x.dtype)


def causal_conv_step(x_t: torch.Tensor, window: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, silu: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding token of a causal depthwise conv: x_t (B, C) the new input, window
    (B, C, K-1) the previous K-1 inputs, oldest first (zeros before the start), weight
    (C, 1, K), bias (C,) or None. Returns y_t (B, C) (silu-ed if ``silu``), the same as the
    last position of ``causal_depthwise_conv`` over the window and x_t, and the new window
    (B, C, K-1). On CUDA with causal-conv1d installed its ``causal_conv1d_update`` (which
    updates a state in place: it gets a copy, so the caller's window is never changed)."""
    K = weight.shape[-1]
    if kernels.choose("causal_conv_step", x_t.device.type, x_t.dtype,
                      width=K) == "causal_conv1d":
        fn = kernels.fast_kernel("causal_conv1d_update").causal_conv1d_update
        state = window.to(x_t.dtype, copy=True).contiguous()  # (B, C, K-1): the kernel updates it
        w = weight.reshape(weight.shape[0], K).to(x_t.dtype)
        b = None if bias is None else bias.to(x_t.dtype)
        out = kernels.attempt("causal_conv1d_update",
                              lambda: fn(x_t, state, w, b, "silu" if silu else None))
        if out is not None:
            return out, state
    # types promote as the operands' (a float32 window and weight keep a bf16 input's step in
    # float32, as the parallel path computes)
    full = torch.cat([window, x_t[:, :, None]], dim=-1)  # (B, C, K)
    y = (full * weight[:, 0, :]).sum(-1)  # (B, C)
    if bias is not None:
        y = y + bias
    return (F.silu(y) if silu else y), full[:, :, 1:]
