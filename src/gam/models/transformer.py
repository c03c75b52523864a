"""The paper's Transformer baseline: pre-LN decoder blocks with causal multi-head attention.

``attention="sdpa"`` (default) calls ``scaled_dot_product_attention(is_causal=True)``, which
uses a fused kernel that never materialises the T x T scores; ``attention="naive"`` builds the
T x T mask and scores explicitly, as the paper's code does, to reproduce its Table 2.

Attention-probability dropout is its own setting (``attn_dropout``): with any dropout > 0,
PyTorch's CPU SDPA leaves its flash kernel for the math kernel, which is as slow and
memory-hungry as naive attention (measured: 8.7 GB vs 1.4 GB for one block at N 2048).
Its default (None) therefore means 0 for ``sdpa`` and the paper's 0.1 (= ``dropout``) for
``naive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.blocks import FeedForward
from gam.models.lm import CausalLM, LMConfig
from gam.models.ops.attention import (
    attention_mixing_flops,
    kv_cache_append,
    kv_cache_filled_bytes,
    kv_cache_from_prefill,
    merge_heads,
    split_heads,
)
from gam.models.ops.fused import Dropout

ATTENTION_KINDS = ("sdpa", "naive")


@dataclass
class TransformerConfig(LMConfig):
    """Transformer hyper-parameters; the defaults are the paper's (24,166,400 parameters)."""

    n_heads: int = 8
    attention: str = "sdpa"
    attn_dropout: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got "
                             f"{self.attention!r}")
        if not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise ValueError(f"n_heads must be a positive integer, got {self.n_heads!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads "
                             f"{self.n_heads}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1) or None, got "
                             f"{self.attn_dropout!r}")

    @property
    def effective_attn_dropout(self) -> float:
        if self.attn_dropout is not None:
            return float(self.attn_dropout)
        return float(self.dropout) if self.attention == "naive" else 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.attention = config.attention
        self.attn_dropout = config.effective_attn_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)  # 3 x (B, T, C)
        return tuple(split_heads(t, self.n_heads) for t in (q, k, v))  # 3 x (B, H, T, hd)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        return self.proj(merge_heads(y))  # (B, T, C)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.attn_dropout if self.training else 0.0
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        T = q.shape[-2]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), diagonal=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return F.dropout(att, p, self.training) @ v  # (B, H, T, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        return self._merge(self._attend(q, k, v))  # (B, T, C)

    # Decode state: a KV cache preallocated to max_seq_len, {"k": (B, H, T_max, hd),
    # "v": (B, H, T_max, hd), "len": tokens stored} (ops.attention).
    def prefill(self, x: torch.Tensor, max_len: int) -> tuple[torch.Tensor, dict]:
        q, k, v = self._heads(x)  # (B, H, T, hd)
        cache = kv_cache_from_prefill(k, v, max_len)
        return self._merge(self._attend(q, k, v)), cache

    def step(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        q, k, v = self._heads(x[:, None])  # (B, H, 1, hd)
        keys, values = kv_cache_append(cache, k, v)  # (B, H, len, hd)
        y = F.scaled_dot_product_attention(q, keys, values)  # (B, H, 1, hd), no mask needed
        return self._merge(y)[:, 0], cache  # (B, C)


class TransformerBlock(nn.Module):
    """Pre-LN: x + attn(ln1(x)), then x + ffn(ln2(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.resid_dropout = Dropout(config.dropout)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config.d_model, config.ffn_mult, config.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.attn.proj, self.ffn.fc2]

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        """QK^T and AV: 2 x 2*T*C per token with the full length T (the PaLM / Chinchilla
        convention), or T/2 with ``causal_halved`` (what a causal kernel executes)."""
        return {"attention": attention_mixing_flops(self.attn.qkv.in_features, seq_len,
                                                    causal_halved)}

    def decode_state_bytes(self, state: dict) -> int:
        """The KV cache is preallocated to max_seq_len: count its first ``len`` positions."""
        return kv_cache_filled_bytes(state)

    def reset_family_parameters(self) -> None:
        pass  # every parameter is in a Linear or a LayerNorm: the scheme covers them all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resid_dropout(self.attn(self.ln1(x)), x)  # x + dropout(attn), (B, T, C)
        return self.ffn(self.ln2(x), x)  # x + ffn, (B, T, C)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        a, cache = self.attn.prefill(self.ln1(x), self.max_seq_len)
        x = x + self.resid_dropout(a)
        return x + self.ffn(self.ln2(x)), cache

    def step(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        a, cache = self.attn.step(self.ln1(x), cache)  # (B, C)
        x = x + self.resid_dropout(a)
        return x + self.ffn(self.ln2(x)), cache


class TransformerLM(CausalLM):
    config: TransformerConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return TransformerBlock(self.config)
