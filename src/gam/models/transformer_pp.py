"""Transformer++: the Llama recipe (Touvron et al. 2023) as a stronger attention baseline.

Against the paper's Transformer (``transformer.py``: learned positions, LayerNorm, GELU FFN,
biases), each block is::

    x = x + dropout(W_o attn(rope(W_q h), rope(W_k h), W_v h)),  h = RMSNorm(x)
    x = x + dropout(W2(silu(W1 h) * W3 h)),                      h = RMSNorm(x)

- rotary position embeddings on q and k (RoFormer, Su et al. 2021; ``ops.rotary``, base
  10,000, rotate-half convention) and no learned position table (``pos_embedding=False``);
- pre-norm RMSNorm (weight only, eps 1e-6), and an RMSNorm before the head
  (``final_norm="rmsnorm"``);
- the SwiGLU FFN (Shazeer 2020) of hidden width ``ffn_hidden_size``: Llama's rule
  ``2/3 * ffn_mult * d`` rounded up to a multiple of 64 unless ``ffn_hidden`` says (1408 at
  d 512: 24,394,240 parameters at the paper preset, tied, the Transformer's 24,166,400 + 0.94%);
- no biases anywhere; causal attention through ``scaled_dot_product_attention``, no attention
  dropout (the residual branches keep the shell's ``dropout``, as the Transformer's).

Cached decoding keeps a KV cache (``ops.attention``) of keys already rotated at their absolute
position; its ``len`` is the position of the next token, so the rotary positions of ``step``
continue those of ``prefill``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.blocks import SwiGLU, make_norm
from gam.models.lm import CausalLM, LMConfig
from gam.models.ops import attention
from gam.models.ops.fused import Dropout
from gam.models.ops.rotary import ROTARY_BASE, apply_rotary

#: The SwiGLU width is rounded up to a multiple of this (Llama's ``multiple_of``).
SWIGLU_MULTIPLE = 64


def swiglu_hidden_size(d_model: int, ffn_mult: int, multiple: int = SWIGLU_MULTIPLE) -> int:
    """Llama's rule: 2/3 of the GELU FFN's ``ffn_mult * d_model`` (three matrices instead of
    two, about the same parameters), rounded up to a multiple of ``multiple``."""
    hidden = int(2 * ffn_mult * d_model / 3)
    return multiple * math.ceil(hidden / multiple)


@dataclass
class TransformerPPConfig(LMConfig):
    """Transformer++ hyper-parameters. No learned positions and a final RMSNorm by default;
    ``ffn_hidden`` None means ``swiglu_hidden_size(d_model, ffn_mult)``."""

    pos_embedding: bool = False
    final_norm: str = "rmsnorm"
    n_heads: int = 8
    ffn_hidden: int | None = None
    rotary_base: float = ROTARY_BASE

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_heads, bool) or not isinstance(self.n_heads, int) \
                or self.n_heads < 1:
            raise ValueError(f"n_heads must be a positive integer, got {self.n_heads!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads "
                             f"{self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rotary embeddings need an even head dimension; d_model "
                             f"{self.d_model} / n_heads {self.n_heads} = "
                             f"{self.d_model // self.n_heads}")
        hidden = self.ffn_hidden
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int)
                                   or hidden < 1):
            raise ValueError(f"ffn_hidden must be a positive integer or None (Llama's rule), "
                             f"got {hidden!r}")
        base = self.rotary_base
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"rotary_base must be a number > 1, got {base!r}")

    @property
    def ffn_hidden_size(self) -> int:
        """The SwiGLU hidden width: ``ffn_hidden``, or Llama's rule."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return swiglu_hidden_size(self.d_model, self.ffn_mult)


class RotaryAttention(nn.Module):
    """Causal multi-head attention with rotary q and k, no biases."""

    def __init__(self, config: TransformerPPConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.rotary_base = float(config.rotary_base)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def _heads(self, x: torch.Tensor, start_pos: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) at positions start_pos.. -> rotated q, k and v, 3 x (B, H, T, hd)."""
        q, k, v = (attention.split_heads(t, self.n_heads)
                   for t in self.qkv(x).split(x.shape[-1], dim=-1))  # 3 x (B, H, T, hd)
        return (apply_rotary(q, start_pos, self.rotary_base),
                apply_rotary(k, start_pos, self.rotary_base), v)

    def _causal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) from position 0 -> output (B, T, C), rotated keys and values."""
        q, k, v = self._heads(x, 0)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.proj(attention.merge_heads(y)), k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._causal(x)[0]  # (B, T, C)

    # Decode state: the KV cache of ops.attention, preallocated to max_seq_len,
    # {"k": (B, H, T_max, hd) rotated keys, "v": (B, H, T_max, hd), "len": next position}.
    def prefill(self, x: torch.Tensor, max_len: int) -> tuple[torch.Tensor, dict]:
        y, k, v = self._causal(x)  # (B, T, C)
        return y, attention.kv_cache_from_prefill(k, v, max_len)

    def step(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        q, k, v = self._heads(x[:, None], cache["len"])  # (B, H, 1, hd), at position len
        keys, values = attention.kv_cache_append(cache, k, v)  # (B, H, len, hd)
        y = F.scaled_dot_product_attention(q, keys, values)  # (B, H, 1, hd), no mask needed
        return self.proj(attention.merge_heads(y))[:, 0], cache  # (B, C)


class TransformerPPBlock(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + swiglu(norm2(x)), both norms RMSNorm."""

    def __init__(self, config: TransformerPPConfig) -> None:
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.norm1 = make_norm("rmsnorm", config.d_model)
        self.attn = RotaryAttention(config)
        self.resid_dropout = Dropout(config.dropout)
        self.norm2 = make_norm("rmsnorm", config.d_model)
        self.ffn = SwiGLU(config.d_model, config.ffn_hidden_size, config.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.attn.proj, self.ffn.w2]

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        """QK^T and AV, as the Transformer's (``ops.attention.attention_mixing_flops``); the
        rotations are element-wise and, like norms and activations, not counted."""
        return {"attention": attention.attention_mixing_flops(self.attn.qkv.in_features,
                                                              seq_len, causal_halved)}

    def decode_state_bytes(self, state: dict) -> int:
        """The KV cache is preallocated to max_seq_len: count its first ``len`` positions."""
        return attention.kv_cache_filled_bytes(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resid_dropout(self.attn(self.norm1(x)), x)  # x + dropout(attn), (B, T, C)
        return self.ffn(self.norm2(x), x)  # x + swiglu, (B, T, C)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        a, cache = self.attn.prefill(self.norm1(x), self.max_seq_len)  # (B, T, C)
        x = self.resid_dropout(a, x)
        return self.ffn(self.norm2(x), x), cache

    def step(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        a, cache = self.attn.step(self.norm1(x), cache)  # (B, C)
        x = self.resid_dropout(a, x)
        return self.ffn(self.norm2(x), x), cache


class TransformerPPLM(CausalLM):
    config: TransformerPPConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return TransformerPPBlock(self.config)
