"""The multi-head gated delta-rule memory as a layer, shared by gam-delta (its third path) and
gated-deltanet (its token mixer): projections, short convs, gates, the rule, the output norm.

Per token, with H heads of key size d_k and value size d_v (h: the layer's input, (B, T, C))::

    q, k, v = silu(ShortCausalConv(Linear(h)))              # per head; q, k L2-normalised
    beta    = sigmoid(Linear(C, H)(h))                       # write strength per head, token
    g       = -exp(A_log) * softplus(Linear(C, H)(h) + dt_bias)   # log-decay <= 0
    S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T   # (d_k, d_v)
    o_t     = RMSNorm(S_t^T q_t / sqrt(d_k))                 # per head, weight shared by heads
    o_t     = o_t * silu(Linear(C, H d_v)(h))                # only with ``output_gate``
    out     = Linear(H d_v, C)(o_t)

The decay is Mamba-2 / Gated DeltaNet's parametrisation (``init_log_decay_parameters``,
``gated_log_decay``): A = exp(A_log) > 0 per head times a softplus step, so g_t <= 0 for any
weights and the decay never exceeds one. ``use_decay=False`` fixes g_t = 0 (plain DeltaNet).
The rule itself is ``gam.models.ops.delta_rule``; the convs ``gam.models.ops.conv``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.ops.conv import causal_conv_silu, causal_depthwise_conv
from gam.models.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step

DELTA_IMPLS = ("chunked", "recurrent")


def check_delta_settings(config: Any, int_fields: tuple[str, ...]) -> None:
    """One-line ValueError for the first bad delta-path field of a family config: the
    ``int_fields`` must be integers >= 1, ``delta_head_dim`` one or None, ``delta_impl`` one of
    ``DELTA_IMPLS``."""
    for name in int_fields:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    d = config.delta_head_dim
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise ValueError(f"delta_head_dim must be an integer >= 1 or None, got {d!r}")
    if config.delta_impl not in DELTA_IMPLS:
        raise ValueError(f"delta_impl must be one of {DELTA_IMPLS}, got {config.delta_impl!r}")


def float32_or_more(x: torch.Tensor) -> torch.dtype:
    """The delta path's compute dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


@torch.no_grad()
def init_log_decay_parameters(A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """In place: A_log = log U[1, 16] and dt_bias = softplus^-1 of a step log-uniform in
    [1e-3, 0.1] (Mamba-2 / Gated DeltaNet), so per-token decays exp(g) start between ~0.2 and
    ~1."""
    H = A_log.shape[0]
    A_log.copy_(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
    dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt = dt.clamp(min=1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt


def gated_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) * softplus(a + dt_bias) <= 0 for the projections a (..., H), in a's
    dtype (callers pass float32: in bf16 softplus would round the small initial steps)."""
    return -torch.exp(A_log.to(a.dtype)) * F.softplus(a + dt_bias.to(a.dtype))


def delta_rule_flops(n_heads: int, d_k: int, d_v: int, chunk_size: int, seq_len: int,
                     causal_halved: bool = False) -> float:
    """Forward FLOPs per token of ``delta_rule_chunked``'s matmuls, with chunk
    C = min(chunk_size, seq_len), per head: the chunk's K K^T and Q K^T rows (2 x 2 C d_k), T
    applied to b V and to b K (2 C d_v + 2 C d_k), the intra-chunk (Q K^T) U (2 C d_v), and the
    three state products W S, Q S, K^T U (3 x 2 d_k d_v). The five chunk products are
    triangular: ``causal_halved`` counts half of them (what a causal kernel would execute; ours
    computes them in full, as the Transformer's convention does). The (C x C) triangular
    inverse, ~C^2/3 per token, is not counted."""
    C = min(chunk_size, seq_len)
    pairwise = 2 * C * (3 * d_k + 2 * d_v) / (2 if causal_halved else 1)
    return float(n_heads * (pairwise + 3 * 2 * d_k * d_v))


class DeltaRuleMemory(nn.Module):
    """Multi-head gated delta-rule memory, h (B, T, C) -> (B, T, C) (see the module docstring).

    q, k and v come from one Linear(C, H (2 d_k + d_v)) (the same as three bias-free Linears,
    one matmul) and one depthwise causal conv over those channels, no bias. Everything after
    that matmul runs in float32 (float64 for float64 models), the delta rule's precision: the
    conv + SiLU is the fused CPU kernel of ``ops.conv.causal_conv_silu``, so the projection is
    converted once and no bf16 element-wise pass is paid for."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, value_dim: int | None = None,
                 conv_size: int = 4, chunk_size: int = 64, use_decay: bool = True,
                 impl: str = "chunked", output_gate: bool = False) -> None:
        super().__init__()
        if impl not in DELTA_IMPLS:
            raise ValueError(f"delta_impl must be one of {DELTA_IMPLS}, got {impl!r}")
        H, dk = n_heads, head_dim
        dv = head_dim if value_dim is None else value_dim
        self.n_heads, self.head_dim, self.value_dim = H, dk, dv
        self.conv_size, self.chunk_size, self.impl = conv_size, chunk_size, impl
        width = H * (2 * dk + dv)
        self.qkv_proj = nn.Linear(d_model, width, bias=False)
        # padding is applied by hand (left only), so the convolution stays causal
        self.qkv_conv = nn.Conv1d(width, width, conv_size, groups=width, bias=False)
        self.b_proj = nn.Linear(d_model, H, bias=False)
        self.a_proj = self.A_log = self.dt_bias = None
        # the decay's parameters are kept out of weight decay (read by flagged_no_weight_decay)
        self.no_weight_decay_names: tuple[str, ...] = ("A_log", "dt_bias") if use_decay else ()
        if use_decay:
            self.a_proj = nn.Linear(d_model, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.reset_family_parameters()
        self.o_norm = nn.RMSNorm(dv, eps=1e-5)  # per head, weight shared by the heads
        self.o_proj = nn.Linear(H * dv, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, H * dv, bias=False) if output_gate else None

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> float:
        """``delta_rule_flops`` of this memory's heads and chunk."""
        return delta_rule_flops(self.n_heads, self.head_dim, self.value_dim, self.chunk_size,
                                seq_len, causal_halved)

    @torch.no_grad()
    def reset_family_parameters(self) -> None:
        """A_log and dt_bias (``init_log_decay_parameters``); nothing without decay."""
        if self.A_log is not None:
            init_log_decay_parameters(self.A_log, self.dt_bias)

    def _gates(self, h: torch.Tensor, pad_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """beta (..., H) in (0, 1) and log-decay (..., H) <= 0 (None without decay), float32;
        padded tokens get beta 0 and log-decay 0 so that they leave S untouched."""
        dtype = float32_or_more(h)
        beta = torch.sigmoid(self.b_proj(h).to(dtype))
        g = None
        if self.a_proj is not None:
            g = gated_log_decay(self.a_proj(h).to(dtype), self.A_log, self.dt_bias)
        if pad_mask is not None:
            keep = pad_mask.to(beta.dtype)[..., None]  # (B, T, 1)
            beta = beta * keep
            g = None if g is None else g * keep
        return beta, g

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """silu(conv) output (..., H (2 d_k + d_v)) -> q, k (unit norm, (..., H, d_k)), v
        (..., H, d_v). In float32: in bf16 the norms would be off by ~1%, and |k| > 1 makes
        I - beta k k^T expanding."""
        H, dk, dv = self.n_heads, self.head_dim, self.value_dim
        if dk == dv:  # one view of the three
            q, k, v = qkv.unflatten(-1, (3 * H, dk)).chunk(3, dim=-2)
        else:
            q, k, v = qkv.split([H * dk, H * dk, H * dv], dim=-1)
            q, k, v = q.unflatten(-1, (H, dk)), k.unflatten(-1, (H, dk)), v.unflatten(-1, (H, dv))
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def _output(self, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # the norm in float32 (the delta rule's own precision); o_proj then runs under autocast
        o = self.o_norm(o.to(float32_or_more(o)))  # (..., H, d_v)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(h).unflatten(-1, (self.n_heads, self.value_dim)))
        return self.o_proj(o.flatten(-2))  # (..., H, d_v) -> (..., C)

    def _conv_silu(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """silu(causal depthwise conv) of the projections x (B, T, W), in float32."""
        x = x.to(float32_or_more(x))
        if reference:
            return F.silu(causal_depthwise_conv(x, self.qkv_conv.weight.to(x.dtype), None))
        return causal_conv_silu(x, self.qkv_conv.weight, x.new_zeros(x.shape[-1]))

    def forward(self, h: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """``reference``: the recurrent rule and PyTorch's conv, to test against."""
        qkv = self._conv_silu(self.qkv_proj(h), reference)  # (B, T, W)
        q, k, v = self._heads(qkv)  # (B, T, H, d)
        beta, g = self._gates(h, None)  # (B, T, H)
        o, _ = self._rule(q, k, v, beta, g, None, reference)
        return self._output(o, h)  # (B, T, C)

    def _rule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
              g: torch.Tensor | None, memory: torch.Tensor | None, reference: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference or self.impl == "recurrent":
            return delta_rule_recurrent(q, k, v, beta, g, memory)
        return delta_rule_chunked(q, k, v, beta, g, memory, self.chunk_size)

    def extend(self, h: torch.Tensor, window: torch.Tensor | None, memory: torch.Tensor | None,
               pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T tokens h (B, T, C) after the conv window (B, conv_size - 1, W) and S (None: the
        start); h must already be zero at padding. Returns (B, T, C), the new window and S.

        The decode state is that window, the last conv_size - 1 pre-conv projections (q, k, v
        concatenated along the channels, in that order; float32), and S (B, H, d_k, d_v),
        float32 (float64 for float64 models)."""
        k1 = self.conv_size - 1
        x = self.qkv_proj(h)  # (B, T, W); zero at padding (no bias), as before the start
        x = x.to(float32_or_more(x))
        if window is None:
            window = x.new_zeros(x.shape[0], k1, x.shape[-1])
        window = torch.cat([window.to(x.dtype), x], dim=1)  # (B, k-1+T, W)
        # the window's first k-1 outputs see the kernel's zero padding: dropped
        q, k, v = self._heads(self._conv_silu(window)[:, k1:])  # (B, T, H, d)
        beta, g = self._gates(h, pad_mask)
        o, memory = self._rule(q, k, v, beta, g, memory)  # (B, T, H, d_v)
        return self._output(o, h), window[:, window.shape[1] - k1:].contiguous(), memory

    def step(self, h: torch.Tensor, window: torch.Tensor, memory: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token h (B, C) -> (B, C), the new window and S."""
        x = self.qkv_proj(h)
        window = torch.cat([window, x.to(window.dtype)[:, None]], dim=1)  # (B, k, W)
        qkv = (window * self.qkv_conv.weight[:, 0, :].T.to(window.dtype)).sum(dim=1)  # (B, W)
        q, k, v = self._heads(F.silu(qkv))  # (B, H, d)
        beta, g = self._gates(h, None)  # (B, H)
        o, memory = delta_rule_step(q, k, v, beta, g, memory)
        return self._output(o, h), window[:, 1:], memory
