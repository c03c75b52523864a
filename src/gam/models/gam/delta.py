"""GAM-Delta: the GAM block plus a memory the sequence writes (GitHub issue 13).

GAM's global path reads a learned bank that is the same for every sequence, so its tokens mix
only through kernel-k causal convolutions and it cannot recall a pair seen further back than
its receptive field. GAM-Delta keeps the block and adds a third path, a multi-head gated
delta-rule memory (DeltaNet, Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"; Gated DeltaNet, Yang, Kautz & Hatamizadeh, ICLR 2025), fused
by GAM's sigmoid gating extended to three paths::

    h      = LayerNorm(x)                                   # (B, T, C)
    local  = CausalDepthwiseConv1d(h)                       # kernel k, as GAM
    global = softmax(h @ M^T) @ M                           # the learned bank, as GAM
    q, k, v = silu(ShortCausalConv(Linear(h)))              # per head; q, k L2-normalised
    beta   = sigmoid(Linear(C, H)(h))                       # write strength per head, token
    g      = -exp(A_log) * softplus(Linear(C, H)(h) + dt_bias)   # log-decay <= 0
    S_t    = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T   # (d_k, d_v) per head
    delta  = Linear(H d_v, C)(RMSNorm(S_t^T q_t / sqrt(d_k)))
    x      = x + sigmoid(g_l) * local + sigmoid(g_g) * global + sigmoid(g_d) * delta
    x      = x + FFN(LayerNorm(x))

The decay is Mamba-2 / Gated DeltaNet's parametrisation: A = exp(A_log) > 0 per head (A_log
from log U[1, 16]) times a softplus step (dt_bias so that softplus starts log-uniform in
[1e-3, 0.1]), so g_t is in (-inf, 0] for any weights and the decay never exceeds one.
``use_delta_decay=False`` fixes g_t = 0 (plain DeltaNet). The path is
``gam.models.ops.delta_memory.DeltaRuleMemory`` (shared with gated-deltanet), the delta rule
itself ``gam.models.ops.delta_rule`` (chunked for training, recurrent reference, one-token
step).

A token now sees the whole context through S: ``receptive_field`` is max_seq_len. Decoding
stays O(1) in the context: the state is the two conv windows and S (``GAMDeltaState``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.blocks import FeedForward
from gam.models.gam.model import GAMConfig, add_gam_paths
from gam.models.lm import CausalLM
from gam.models.ops.conv import causal_depthwise_conv
from gam.models.ops.delta_memory import DeltaRuleMemory, check_delta_settings
from gam.models.ops.fused import gated_residual, gated_residual_reference
from gam.models.ops.memory_retrieval import (
    memory_bank_flops,
    memory_retrieval,
    memory_retrieval_reference,
)
from gam.runtime import autocast_dtype


@dataclass
class GAMDeltaConfig(GAMConfig):
    """GAM's fields plus the delta-rule path. ``use_global=False`` is the "without the learned
    bank" ablation, ``use_delta_decay=False`` the ungated (DeltaNet) memory. Paper size with the
    defaults (4 heads of 128): 30,529,328 parameters; ``ffn_mult=2, delta_head_dim=96``
    gives 22,649,456, GAM's 22,599,680 + 0.22% (``gam-delta-matched``)."""

    delta_heads: int = 4
    delta_head_dim: int | None = None  # d_k = d_v; None -> d_model // delta_heads
    delta_conv_size: int = 4
    delta_chunk_size: int = 64
    use_delta_decay: bool = True
    delta_impl: str = "chunked"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_delta_settings(self, ("delta_heads", "delta_conv_size", "delta_chunk_size"))
        if self.delta_head_dim is None and self.d_model % self.delta_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by delta_heads "
                             f"{self.delta_heads}; set delta_head_dim")
        if not isinstance(self.use_delta_decay, bool):
            raise ValueError(f"use_delta_decay must be a bool, got {self.use_delta_decay!r}")

    @property
    def receptive_field(self) -> int:
        return self.max_seq_len  # the delta memory carries the whole context

    @property
    def delta_head_dim_value(self) -> int:
        """delta_head_dim with None resolved to d_model // delta_heads."""
        if self.delta_head_dim is not None:
            return self.delta_head_dim
        return self.d_model // self.delta_heads


class GAMDeltaState(NamedTuple):
    """Decode state of one GAM-Delta block, O(1) in the context length:

    - ``conv`` (B, k-1, C): the last conv_kernel_size - 1 LayerNorm-ed inputs, oldest first
      (zeros before the start), the window of GAM's local conv;
    - ``qkv`` (B, delta_conv_size - 1, 3 H d): the last pre-conv q/k/v projections (q, k, v
      concatenated along the channels, in that order; float32), the window of the short convs;
    - ``memory`` (B, H, d_k, d_v): the delta-rule state S, float32 (float64 for float64
      models).
    """

    conv: torch.Tensor
    qkv: torch.Tensor
    memory: torch.Tensor


class GAMDeltaBlock(nn.Module):
    """GAM's block (same parameter names: ln1, causal_conv, memory_bank, gate, ln2, ffn) with
    the delta-rule memory ``delta`` as a third gated path."""

    def __init__(self, config: GAMDeltaConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        add_gam_paths(self, c)
        self.delta = DeltaRuleMemory(c.d_model, c.delta_heads, c.delta_head_dim_value,
                                     conv_size=c.delta_conv_size, chunk_size=c.delta_chunk_size,
                                     use_decay=c.use_delta_decay, impl=c.delta_impl)
        self.n_paths = int(c.use_local) + int(c.use_global) + 1
        self.gate = nn.Linear(c.d_model, self.n_paths * c.d_model) if c.use_gate else None
        self.ln2 = nn.LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.ffn_mult, c.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        # the delta path ends in o_proj (like attention's proj); conv and bank have no Linear
        return [self.delta.o_proj, self.ffn.fc2]

    def reset_family_parameters(self) -> None:
        if self.memory_bank is not None:
            nn.init.xavier_uniform_(self.memory_bank)
        self.delta.reset_family_parameters()

    def gate_paths(self) -> list[str]:
        """The gate's chunks: GAM's paths, then the delta memory."""
        if self.gate is None:
            return []
        return [name for name, on in (("local", self.config.use_local),
                                      ("global", self.config.use_global), ("delta", True)) if on]

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        return {"memory": memory_bank_flops(self.memory_bank),
                "delta": self.delta.mixing_flops(seq_len, causal_halved)}

    def _fuse_residual(self, x: torch.Tensor, h: torch.Tensor, paths: list[torch.Tensor],
                       reference: bool = False) -> torch.Tensor:
        """x + sum_i sigmoid(g_i) * path_i (x + sum of the paths without the gate), the FFN
        sub-block after it."""
        if self.gate is None:
            y = x + sum(paths[1:], paths[0])
        elif reference:
            y = gated_residual_reference(x, self.gate(h), paths)
        else:
            y = gated_residual(x, self.gate(h), paths)
        return self.ffn(self.ln2(y), y)  # y + FFN(LN(y)), (..., C)

    def _gam_paths(self, h: torch.Tensor, local: torch.Tensor | None, reference: bool
                   ) -> list[torch.Tensor]:
        paths = [] if local is None else [local]
        if self.memory_bank is not None:
            retrieve = memory_retrieval_reference if reference else (
                lambda h_, m: memory_retrieval(h_, m, self.config.retrieval))
            paths.append(retrieve(h, self.memory_bank))  # (..., C)
        return paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, reference=False)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Recurrent delta rule, materialised retrieval, unfused gating: to test against."""
        return self._forward(x, reference=True)

    def _ln1(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln1(x)  # (..., C)
        if pad_mask is not None:
            h = h * pad_mask[..., None].to(h.dtype)
        # Five matmuls and a conv read h: under autocast each would cast it (and its gradient)
        # on its own. One cast up front instead, the same values.
        return h.to(autocast_dtype(h))

    def _forward(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        h = self._ln1(x)  # (B, T, C)
        local = None
        if self.causal_conv is not None:
            local = causal_depthwise_conv(h, self.causal_conv.weight, self.causal_conv.bias)
        paths = self._gam_paths(h, local, reference)
        paths.append(self.delta(h, reference=reference))  # (B, T, C)
        return self._fuse_residual(x, h, paths, reference)

    # ------------------------------------------------------------------ decode
    # Decode state: a GAMDeltaState (both conv windows and S), see GAMDeltaState.
    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, GAMDeltaState]:
        return self.extend(x)

    def extend(self, x: torch.Tensor, state: GAMDeltaState | None = None,
               pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, GAMDeltaState]:
        """Run T new tokens x (B, T, C) that follow ``state`` (None = the start).

        ``pad_mask`` (B, T), False at padding: the padded tokens' normalised inputs are zeroed
        (the zeros both convs see before a sequence starts) and they neither write to nor decay
        S (beta 0, log-decay 0), so a left-padded row computes what it would alone. Returns the
        outputs (B, T, C) and the new state.
        """
        B, T, C = x.shape
        k1 = self.config.conv_kernel_size - 1
        h = self._ln1(x, pad_mask)  # (B, T, C)
        conv = h.new_zeros(B, k1, C) if state is None else state.conv.to(h.dtype)
        window = torch.cat([conv, h], dim=1)  # (B, k-1+T, C)
        local = None
        if self.causal_conv is not None:
            local = F.conv1d(window.transpose(1, 2), self.causal_conv.weight,
                             self.causal_conv.bias, groups=C).transpose(1, 2)  # (B, T, C)
        paths = self._gam_paths(h, local, reference=False)
        delta, qkv, memory = self.delta.extend(h, None if state is None else state.qkv,
                                               None if state is None else state.memory,
                                               pad_mask)
        y = self._fuse_residual(x, h, [*paths, delta])
        new_state = GAMDeltaState(window[:, window.shape[1] - k1:].contiguous(), qkv, memory)
        return y, new_state

    def step(self, x: torch.Tensor, state: GAMDeltaState) -> tuple[torch.Tensor, GAMDeltaState]:
        h = self._ln1(x)  # (B, C)
        window = torch.cat([state.conv, h[:, None]], dim=1)  # (B, k, C)
        local = None
        if self.causal_conv is not None:
            w = self.causal_conv.weight[:, 0, :].T  # (k, C)
            local = (window * w).sum(dim=1) + self.causal_conv.bias  # (B, C)
        paths = self._gam_paths(h, local, reference=True)
        delta, qkv, memory = self.delta.step(h, state.qkv, state.memory)  # (B, C)
        y = self._fuse_residual(x, h, [*paths, delta])
        return y, GAMDeltaState(window[:, 1:], qkv, memory)


class GAMDeltaLM(CausalLM):
    """GAM-Delta language model: GAMDeltaBlocks in the shared shell. The delta memory carries
    information across the whole context, so the receptive field is max_seq_len."""

    config: GAMDeltaConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return GAMDeltaBlock(self.config)
