"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", ICLR 2025): the pure delta-rule baseline of gam-delta (GitHub issue 24).

Pre-norm residual blocks, no learned positions, RMSNorm final norm (Llama style)::

    x = x + dropout(GatedDeltaNet(RMSNorm(x)))
    x = x + dropout(SwiGLU(RMSNorm(x)))

with the token mixer, per head (H heads, key size d_k, value size d_v = expand_v d_k)::

    q, k, v = silu(ShortCausalConv_4(W_q h)), ... (W_k h), ... (W_v h)   # q, k L2-normalised
    beta    = sigmoid(W_b h)                                   # (B, T, H)
    g       = -exp(A_log) * softplus(W_a h + dt_bias)          # log-decay <= 0, (B, T, H)
    S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T   # (d_k, d_v)
    o_t     = RMSNorm(S_t^T q_t / sqrt(d_k)) * silu(W_g h)     # per head, output gate
    out     = W_o o_t

A = exp(A_log) with A ~ U[1, 16] and dt_bias = softplus^-1(dt), dt log-uniform in
[1e-3, 1e-1], as the paper's reference code. The mixer is the delta-rule memory gam-delta uses
(``gam.models.ops.delta_memory.DeltaRuleMemory``, here with its output gate and d_v != d_k),
so both families run the same delta rule (``gam.models.ops.delta_rule``) and convs
(``gam.models.ops.conv``).

Sizes: the reference layer's allocation (hidden 2048: 6 heads of d_k 256, expand_v 2, i.e.
key dim 0.75 C and value dim 1.5 C) scaled to C: 6 heads of d_k = C / 8 (64 at d 512) and d_v
= 2 d_k; the SwiGLU width is ``mlp_ratio * C`` and sets the size (docs/design.md, "Gated
DeltaNet"). Decoding is O(1) in the context: the state is the short convs' window and S
(``GatedDeltaNetState``); every token sees the whole context (receptive field max_seq_len).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from gam.models.blocks import SwiGLU, make_norm
from gam.models.lm import CausalLM, LMConfig
from gam.models.ops.delta_memory import DeltaRuleMemory, check_delta_settings
from gam.models.ops.fused import Dropout

DEFAULT_MLP_RATIO = 3.375  # 1728 at d 512: gam-delta's parameter count (docs/design.md)


@dataclass
class GatedDeltaNetConfig(LMConfig):
    """Gated DeltaNet hyper-parameters. Paper preset with the defaults (6 heads of d_k 64,
    d_v 128, SwiGLU width 1728): 30,563,656 parameters under ``init="paper"``, gam-delta's
    30,529,328 + 0.11%; ``mlp_ratio=1.6875`` (width 864) gives 22,601,032, GAM's 22,599,680
    + 0.01% (``gated-deltanet-matched``). ``ffn_mult`` is not used (the MLP width is
    ``mlp_ratio``)."""

    pos_embedding: bool = False
    final_norm: str = "rmsnorm"
    delta_heads: int = 6
    delta_head_dim: int | None = None  # d_k; None -> 3 d_model / (4 delta_heads)
    expand_v: int = 2  # d_v = expand_v * d_k
    delta_conv_size: int = 4
    delta_chunk_size: int = 64
    delta_impl: str = "chunked"
    mlp_ratio: float = DEFAULT_MLP_RATIO  # SwiGLU hidden width = round(mlp_ratio * d_model)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_delta_settings(self, ("delta_heads", "expand_v", "delta_conv_size",
                                    "delta_chunk_size"))
        if self.delta_head_dim is None and (3 * self.d_model) % (4 * self.delta_heads):
            raise ValueError(f"3/4 of d_model {self.d_model} is not divisible by delta_heads "
                             f"{self.delta_heads}; set delta_head_dim")
        r = self.mlp_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not round(r * self.d_model):
            raise ValueError(f"mlp_ratio must be a number with round(mlp_ratio * d_model) >= 1, "
                             f"got {r!r}")
        if self.ffn_mult != 4:  # a silently ignored setting would be a wrong model
            raise ValueError(f"Gated DeltaNet sizes its MLP with mlp_ratio, not ffn_mult; got "
                             f"ffn_mult {self.ffn_mult!r}")

    @property
    def receptive_field(self) -> int:
        return self.max_seq_len  # S carries the whole context

    @property
    def head_dim_value(self) -> int:
        """d_k: delta_head_dim, None resolved to 3 d_model / (4 delta_heads)."""
        if self.delta_head_dim is not None:
            return self.delta_head_dim
        return 3 * self.d_model // (4 * self.delta_heads)

    @property
    def mlp_hidden(self) -> int:
        """The SwiGLU's hidden width, round(mlp_ratio * d_model)."""
        return round(self.mlp_ratio * self.d_model)


class GatedDeltaNetState(NamedTuple):
    """Decode state of one block, O(1) in the context length:

    - ``qkv`` (B, delta_conv_size - 1, H (2 d_k + d_v)): the last pre-conv q/k/v projections
      (concatenated along the channels in that order, float32), the short convs' window;
    - ``memory`` (B, H, d_k, d_v): the delta-rule state S, float32 (float64 for float64
      models).
    """

    qkv: torch.Tensor
    memory: torch.Tensor


class GatedDeltaNetBlock(nn.Module):
    """x + dropout(mixer(norm1(x))), then x + dropout(mlp(norm2(x)))."""

    def __init__(self, config: GatedDeltaNetConfig) -> None:
        super().__init__()
        c = config
        dk = c.head_dim_value
        self.norm1 = make_norm("rmsnorm", c.d_model)
        self.mixer = DeltaRuleMemory(c.d_model, c.delta_heads, dk, c.expand_v * dk,
                                     conv_size=c.delta_conv_size, chunk_size=c.delta_chunk_size,
                                     impl=c.delta_impl, output_gate=True)
        self.resid_dropout = Dropout(c.dropout)
        self.norm2 = make_norm("rmsnorm", c.d_model)
        self.mlp = SwiGLU(c.d_model, c.mlp_hidden, c.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.mixer.o_proj, self.mlp.w2]

    def reset_family_parameters(self) -> None:
        self.mixer.reset_family_parameters()  # A_log, dt_bias

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        """The chunked delta rule's matmuls (``ops.delta_memory.delta_rule_flops``)."""
        return {"delta": self.mixer.mixing_flops(seq_len, causal_halved)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resid_dropout(self.mixer(self.norm1(x)), x)  # (B, T, C)
        return self.mlp(self.norm2(x), x)  # (B, T, C)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The recurrent delta rule and PyTorch's conv: to test against."""
        x = self.resid_dropout(self.mixer(self.norm1(x), reference=True), x)
        return self.mlp(self.norm2(x), x)

    # ------------------------------------------------------------------ decode
    # Decode state: a GatedDeltaNetState (the short convs' window and S), see there.
    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, GatedDeltaNetState]:
        return self.extend(x)

    def extend(self, x: torch.Tensor, state: GatedDeltaNetState | None = None
               ) -> tuple[torch.Tensor, GatedDeltaNetState]:
        """T new tokens x (B, T, C) after ``state`` (None: the start) -> (B, T, C), new state."""
        y, window, memory = self.mixer.extend(self.norm1(x), None if state is None else state.qkv,
                                              None if state is None else state.memory, None)
        x = self.resid_dropout(y, x)
        return self.mlp(self.norm2(x), x), GatedDeltaNetState(window, memory)

    def step(self, x: torch.Tensor, state: GatedDeltaNetState
             ) -> tuple[torch.Tensor, GatedDeltaNetState]:
        y, window, memory = self.mixer.step(self.norm1(x), state.qkv, state.memory)  # (B, C)
        x = self.resid_dropout(y, x)
        return self.mlp(self.norm2(x), x), GatedDeltaNetState(window, memory)


class GatedDeltaNetLM(CausalLM):
    """Gated DeltaNet language model: GatedDeltaNetBlocks in the shared shell."""

    config: GatedDeltaNetConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return GatedDeltaNetBlock(self.config)
