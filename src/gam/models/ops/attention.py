"""Pieces of causal multi-head self-attention shared by the attention families (Transformer,
Transformer++): splitting and merging heads, the preallocated KV cache of cached decoding, and
the attention FLOPs per token.

The KV cache is a dict ``{"k": (B, H, T_max, hd), "v": (B, H, T_max, hd), "len": n}``,
preallocated to ``max_seq_len`` so that a decode step writes in place; its first ``len``
positions are filled, and ``len`` is the position of the next token.
"""

from __future__ import annotations

import torch


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, H, T, C / H)."""
    B, T, C = t.shape
    return t.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) -> (B, T, H * hd)."""
    B, H, T, hd = y.shape
    return y.transpose(1, 2).reshape(B, T, H * hd)


def kv_cache_from_prefill(k: torch.Tensor, v: torch.Tensor, max_len: int) -> dict:
    """A KV cache of ``max_len`` positions holding a prompt's keys and values (B, H, T, hd)."""
    B, H, T, hd = k.shape
    cache = {"k": k.new_zeros(B, H, max_len, hd), "v": v.new_zeros(B, H, max_len, hd),
             "len": T}
    cache["k"][:, :, :T] = k
    cache["v"][:, :, :T] = v
    return cache


def kv_cache_append(cache: dict, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Store one token's key and value (B, H, 1, hd) at position ``cache["len"]`` (in place) and
    return every stored key and value (B, H, len, hd)."""
    n = cache["len"]
    cache["k"][:, :, n] = k[:, :, 0]
    cache["v"][:, :, n] = v[:, :, 0]
    cache["len"] = n + 1
    return cache["k"][:, :, : n + 1], cache["v"][:, :, : n + 1]


def kv_cache_filled_bytes(cache: dict) -> int:
    """Bytes of the filled part of a KV cache: its first ``len`` positions of K and V."""
    n = int(cache["len"])
    return sum(cache[key][..., :n, :].numel() * cache[key].element_size()
               for key in ("k", "v"))


def attention_mixing_flops(d_model: int, seq_len: int, causal_halved: bool = False) -> float:
    """QK^T and AV: 2 x 2*T*C forward FLOPs per token with the full length T (the PaLM /
    Chinchilla convention), or T/2 with ``causal_halved`` (what a causal kernel executes)."""
    t_eff = seq_len / 2 if causal_halved else seq_len
    return 2 * 2.0 * t_eff * d_model
