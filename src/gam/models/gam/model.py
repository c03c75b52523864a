"""Gated Associative Memory (arXiv 2509.00605).

One GAM block::

    h      = LayerNorm(x)                                  # (B, T, C)
    local  = CausalDepthwiseConv1d(h)                      # kernel k, mixes tokens t-k+1..t
    global = softmax(h @ M^T) @ M                          # M: (num_slots, C), per token
    g_l, g_g = Linear(C, 2C)(h).chunk(2)
    x      = x + sigmoid(g_l) * local + sigmoid(g_g) * global
    x      = x + FFN(LayerNorm(x))

The global path reads a learned memory bank that is the same for every sequence: a token
retrieves from it using only its own features. Tokens therefore mix only through the causal
convolutions, and a stack of ``n_layers`` blocks sees ``1 + n_layers * (k - 1)`` tokens
(13 for the paper model). ``receptive_field`` reports it and the tests prove it.

The fast path never keeps the (B, T, slots) score tensor for backward: by default a fused
matmul retrieval that recomputes the scores in backward (``retrieval="fused"``), or
``scaled_dot_product_attention`` with query h, key and value M, scale 1 (``retrieval="sdpa"``).
``GAMBlock.forward_reference`` is the paper's formula, materialised, to test against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.blocks import FeedForward
from gam.models.lm import CausalLM, LMConfig
from gam.models.ops.conv import causal_depthwise_conv
from gam.models.ops.fused import gated_residual
from gam.models.ops.memory_retrieval import (
    RETRIEVAL_IMPLS,
    memory_bank_flops,
    memory_retrieval,
    memory_retrieval_reference,
)


@dataclass
class GAMConfig(LMConfig):
    """GAM hyper-parameters; the defaults are the paper's (22,599,680 parameters).

    Ablations of the paper's Table 3: ``use_local=False, use_gate=False`` (global only),
    ``use_gate=False`` (sum fusion), ``use_global=False, use_gate=False`` (local only).
    """

    num_memory_slots: int = 512
    conv_kernel_size: int = 3
    use_local: bool = True
    use_global: bool = True
    use_gate: bool = True
    retrieval: str = "fused"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retrieval not in RETRIEVAL_IMPLS:
            raise ValueError(f"retrieval must be one of {RETRIEVAL_IMPLS}, got "
                             f"{self.retrieval!r}")
        if not (self.use_local or self.use_global):
            raise ValueError("a GAM block needs at least one path: use_local or use_global")
        if isinstance(self.conv_kernel_size, bool) or not isinstance(self.conv_kernel_size, int) \
                or self.conv_kernel_size < 1:
            raise ValueError(f"conv_kernel_size must be an integer >= 1, got "
                             f"{self.conv_kernel_size!r}")
        if isinstance(self.num_memory_slots, bool) or not isinstance(self.num_memory_slots, int) \
                or self.num_memory_slots < 1:
            raise ValueError(f"num_memory_slots must be an integer >= 1, got "
                             f"{self.num_memory_slots!r}")

    @property
    def receptive_field(self) -> int:
        return gam_receptive_field(self)


def add_gam_paths(block: nn.Module, c: GAMConfig) -> None:
    """Give ``block`` GAM's input norm and its two paths, in the official code's order and
    names: ``ln1``, the local ``causal_conv`` (None without ``use_local``) and the global
    ``memory_bank`` (None without ``use_global``). GAMBlock and GAMDeltaBlock share them."""
    block.ln1 = nn.LayerNorm(c.d_model)
    block.causal_conv = None
    if c.use_local:
        # padding is applied by hand (left only), so Conv1d's own padding stays 0
        block.causal_conv = nn.Conv1d(c.d_model, c.d_model, c.conv_kernel_size,
                                      groups=c.d_model)
    block.memory_bank = None
    if c.use_global:
        block.memory_bank = nn.Parameter(torch.empty(c.num_memory_slots, c.d_model))
        nn.init.xavier_uniform_(block.memory_bank)


class GAMBlock(nn.Module):
    """One GAM block. Parameter names follow the official code (causal_conv, memory_bank,
    gate, ln1, ln2) except the FFN's (official ``ffn.0``/``ffn.2``, here ``ffn.fc1``/``ffn.fc2``):
    ``gam.load_official`` (models/official.py) renames an official checkpoint's keys."""

    def __init__(self, config: GAMConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        add_gam_paths(self, c)
        self.n_paths = int(c.use_local) + int(c.use_global)
        self.gate = nn.Linear(c.d_model, self.n_paths * c.d_model) if c.use_gate else None
        self.ln2 = nn.LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.ffn_mult, c.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        # The conv + memory branch ends in the gated sum, with no output Linear: only the FFN.
        return [self.ffn.fc2]

    def reset_family_parameters(self) -> None:
        if self.memory_bank is not None:
            nn.init.xavier_uniform_(self.memory_bank)

    def gate_paths(self) -> list[str]:
        if self.gate is None:
            return []
        return [name for name, on in (("local", self.config.use_local),
                                      ("global", self.config.use_global)) if on]

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        """The memory bank (S x C) is read twice per token: scores h M^T and readout P M."""
        return {"memory": memory_bank_flops(self.memory_bank)}

    def _fuse(self, h: torch.Tensor, local: torch.Tensor | None, global_: torch.Tensor | None
              ) -> torch.Tensor:
        paths = [p for p in (local, global_) if p is not None]
        if self.gate is None:
            return paths[0] if len(paths) == 1 else paths[0] + paths[1]
        gates = torch.sigmoid(self.gate(h)).chunk(self.n_paths, dim=-1)  # n_paths x (..., C)
        out = gates[0] * paths[0]
        for g, p in zip(gates[1:], paths[1:], strict=True):
            out = out + g * p
        return out

    def _fuse_residual(self, x: torch.Tensor, h: torch.Tensor, local: torch.Tensor | None,
                       global_: torch.Tensor | None) -> torch.Tensor:
        """x + _fuse(h, local, global_), the gating and the residual add in one node
        (``fused.gated_residual``)."""
        if self.gate is None:
            return x + self._fuse(h, local, global_)
        return gated_residual(x, self.gate(h), [p for p in (local, global_) if p is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)  # (B, T, C)
        local = global_ = None
        if self.causal_conv is not None:
            local = causal_depthwise_conv(h, self.causal_conv.weight, self.causal_conv.bias)
        if self.memory_bank is not None:
            global_ = memory_retrieval(h, self.memory_bank, self.config.retrieval)  # (B, T, C)
        x = self._fuse_residual(x, h, local, global_)  # (B, T, C)
        return self.ffn(self.ln2(x), x)  # x + FFN(LN(x)), (B, T, C)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's block, written as in the official code, to test the fast path against."""
        h = self.ln1(x)  # (B, T, C)
        local = global_ = None
        if self.causal_conv is not None:
            k = self.config.conv_kernel_size
            conv = F.conv1d(h.permute(0, 2, 1), self.causal_conv.weight, self.causal_conv.bias,
                            padding=k - 1, groups=h.shape[-1])  # (B, C, T + k - 1)
            local = conv[:, :, : x.shape[1]].permute(0, 2, 1)  # (B, T, C)
        if self.memory_bank is not None:
            global_ = memory_retrieval_reference(h, self.memory_bank)  # (B, T, C)
        x = x + self._fuse(h, local, global_)
        return x + self.ffn(self.ln2(x))

    # ------------------------------------------------------------------ decode
    # Decode state: the last (k - 1) LayerNorm-ed block inputs, (B, k-1, C), oldest first; zeros
    # stand for positions before the start. O(1) in the context length.
    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extend(x)

    def extend(self, x: torch.Tensor, state: torch.Tensor | None = None,
               pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run T new tokens x (B, T, C) that follow ``state`` (B, k-1, C; None = the start).

        ``pad_mask`` (B, T), False at padding, zeroes the padded tokens' normalised inputs:
        exactly the zeros a sequence sees before its start, so a left-padded row computes what
        it would alone. Returns the outputs (B, T, C) and the new state (B, k-1, C).
        """
        B, T, C = x.shape
        k1 = self.config.conv_kernel_size - 1
        h = self.ln1(x)  # (B, T, C)
        if pad_mask is not None:
            h = h * pad_mask[..., None].to(h.dtype)
        if state is None:
            state = h.new_zeros(B, k1, C)
        window = torch.cat([state.to(h.dtype), h], dim=1)  # (B, k-1+T, C)
        local = global_ = None
        if self.causal_conv is not None:
            local = F.conv1d(window.transpose(1, 2), self.causal_conv.weight,
                             self.causal_conv.bias, groups=C).transpose(1, 2)  # (B, T, C)
        if self.memory_bank is not None:
            global_ = memory_retrieval(h, self.memory_bank, self.config.retrieval)
        y = self._fuse_residual(x, h, local, global_)
        y = self.ffn(self.ln2(y), y)
        return y, window[:, window.shape[1] - k1:].contiguous()

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln1(x)  # (B, C)
        window = torch.cat([state, h[:, None]], dim=1)  # (B, k, C)
        local = global_ = None
        if self.causal_conv is not None:
            w = self.causal_conv.weight[:, 0, :].T  # (k, C)
            local = (window * w).sum(dim=1) + self.causal_conv.bias  # (B, C)
        if self.memory_bank is not None:
            global_ = memory_retrieval_reference(h, self.memory_bank)  # (B, C)
        y = self._fuse_residual(x, h, local, global_)
        y = self.ffn(self.ln2(y), y)
        return y, window[:, 1:]


class GAMLM(CausalLM):
    """The GAM language model of the paper."""

    config: GAMConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return GAMBlock(self.config)


def gam_receptive_field(config: GAMConfig) -> int:
    """Tokens that can influence one position's logits: 1 + n_layers * (k - 1), capped by
    max_seq_len; 1 when the convolution is ablated away (the memory path is per token)."""
    if not config.use_local:
        return 1
    return min(1 + config.n_layers * (config.conv_kernel_size - 1), config.max_seq_len)
