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
``use_delta_decay=False`` fixes g_t = 0 (plain DeltaNet). The delta rule itself lives in
``gam.models.ops.delta_rule`` (chunked for training, recurrent reference, one-token step).

A token now sees the whole context through S: ``receptive_field`` is max_seq_len. Decoding
stays O(1) in the context: the state is the two conv windows and S (``GAMDeltaState``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.gam import GAMConfig, add_gam_paths
from gam.models.lm import CausalLM, FeedForward
from gam.models.ops.conv import causal_conv_silu, causal_depthwise_conv
from gam.models.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step
from gam.models.ops.fused import gated_residual, gated_residual_reference
from gam.models.ops.memory_retrieval import (
    memory_bank_flops,
    memory_retrieval,
    memory_retrieval_reference,
)
from gam.runtime import autocast_dtype

DELTA_IMPLS = ("chunked", "recurrent")


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
        for name in ("delta_heads", "delta_conv_size", "delta_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        d = self.delta_head_dim
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"delta_head_dim must be an integer >= 1 or None, got {d!r}")
        if d is None and self.d_model % self.delta_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by delta_heads "
                             f"{self.delta_heads}; set delta_head_dim")
        if self.delta_impl not in DELTA_IMPLS:
            raise ValueError(f"delta_impl must be one of {DELTA_IMPLS}, got {self.delta_impl!r}")
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


def _float32_or_more(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


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


class DeltaRuleMemory(nn.Module):
    """The third path: multi-head gated delta-rule memory, h (B, T, C) -> (B, T, C).

    q, k and v come from one Linear(C, 3 H d) (the same as three bias-free Linears, one
    matmul) and one depthwise causal conv over the 3 H d channels. Everything after that
    matmul runs in float32 (float64 for float64 models), the delta rule's precision: the
    conv + SiLU is the fused CPU kernel of ``ops.conv.causal_conv_silu``, so the projection
    is converted once and no bf16 element-wise pass is paid for."""

    def __init__(self, config: GAMDeltaConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        H, d = c.delta_heads, c.delta_head_dim_value
        self.n_heads, self.head_dim = H, d
        inner = H * d
        self.qkv_proj = nn.Linear(c.d_model, 3 * inner, bias=False)
        # padding is applied by hand (left only), so the convolution stays causal
        self.qkv_conv = nn.Conv1d(3 * inner, 3 * inner, c.delta_conv_size, groups=3 * inner,
                                  bias=False)
        self.b_proj = nn.Linear(c.d_model, H, bias=False)
        self.a_proj = self.A_log = self.dt_bias = None
        if c.use_delta_decay:
            self.a_proj = nn.Linear(c.d_model, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
            self.reset_family_parameters()
        self.o_norm = nn.RMSNorm(d, eps=1e-5)  # per head, weight shared by the heads
        self.o_proj = nn.Linear(inner, c.d_model, bias=False)

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> float:
        """Forward FLOPs per token of the chunked delta rule's matmuls, per head with chunk
        C = min(chunk size, seq_len) and d = d_k = d_v: the chunk's K K^T and Q K^T rows
        (2 x 2Cd), T applied to b V and b K (2 x 2Cd), the intra-chunk (Q K^T) V' (2Cd), and the
        three state products W S, Q S, K^T V' (3 x 2d^2). The five chunk products are
        triangular: ``causal_halved`` counts half of them (what a causal kernel would execute;
        ours computes them in full, as the Transformer's convention does). The (C x C)
        triangular inverse, ~C^2/3 per token, is not counted."""
        C = min(self.config.delta_chunk_size, seq_len)
        d = self.head_dim
        pairwise = 5 * 2 * C * d / (2 if causal_halved else 1)
        return float(self.n_heads * (pairwise + 3 * 2 * d * d))

    @torch.no_grad()
    def reset_family_parameters(self) -> None:
        """A_log = log U[1, 16] and dt_bias = softplus^-1 of a step log-uniform in [1e-3, 0.1]
        (Mamba-2 / Gated DeltaNet): per-token decays exp(g) start between ~0.2 and ~1."""
        if self.A_log is None:
            return
        H = self.A_log.shape[0]
        self.A_log.copy_(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def _gates(self, h: torch.Tensor, pad_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """beta (..., H) in (0, 1) and log-decay (..., H) <= 0 (None without decay), float32;
        padded tokens get beta 0 and log-decay 0 so that they leave S untouched."""
        dtype = _float32_or_more(h)
        beta = torch.sigmoid(self.b_proj(h).to(dtype))
        g = None
        if self.a_proj is not None:
            # softplus in float32: bf16 would round the small initial steps
            g = -torch.exp(self.A_log.to(dtype)) * F.softplus(self.a_proj(h).to(dtype)
                                                              + self.dt_bias.to(dtype))
        if pad_mask is not None:
            keep = pad_mask.to(beta.dtype)[..., None]  # (B, T, 1)
            beta = beta * keep
            g = None if g is None else g * keep
        return beta, g

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """silu(conv) output (..., 3 H d) -> q, k (unit norm), v (..., H, d). In float32: in
        bf16 the norms would be off by ~1%, and |k| > 1 makes I - beta k k^T expanding."""
        q, k, v = qkv.unflatten(-1, (3 * self.n_heads, self.head_dim)).chunk(3, dim=-2)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        # the norm in float32 (the delta rule's own precision); o_proj then runs under autocast
        o = self.o_norm(o.to(_float32_or_more(o)))
        return self.o_proj(o.flatten(-2))  # (..., H, d) -> (..., C)

    def _conv_silu(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """silu(causal depthwise conv) of the projections x (B, T, 3Hd), in float32."""
        x = x.to(_float32_or_more(x))
        if reference:
            return F.silu(causal_depthwise_conv(x, self.qkv_conv.weight.to(x.dtype), None))
        return causal_conv_silu(x, self.qkv_conv.weight, x.new_zeros(x.shape[-1]))

    def forward(self, h: torch.Tensor, reference: bool = False) -> torch.Tensor:
        qkv = self._conv_silu(self.qkv_proj(h), reference)  # (B, T, 3Hd)
        q, k, v = self._heads(qkv)  # (B, T, H, d)
        beta, g = self._gates(h, None)  # (B, T, H)
        o, _ = self._rule(q, k, v, beta, g, None, reference)
        return self._output(o)  # (B, T, C)

    def _rule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
              g: torch.Tensor | None, memory: torch.Tensor | None, reference: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference or self.config.delta_impl == "recurrent":
            return delta_rule_recurrent(q, k, v, beta, g, memory)
        return delta_rule_chunked(q, k, v, beta, g, memory, self.config.delta_chunk_size)

    def extend(self, h: torch.Tensor, window: torch.Tensor | None, memory: torch.Tensor | None,
               pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T tokens h (B, T, C) after the conv window (B, k-1, 3Hd) and S (None: the start);
        h must already be zero at padding. Returns (B, T, C), the new window and S."""
        k1 = self.config.delta_conv_size - 1
        x = self.qkv_proj(h)  # (B, T, 3Hd); zero at padding (no bias), as before the start
        x = x.to(_float32_or_more(x))
        if window is None:
            window = x.new_zeros(x.shape[0], k1, x.shape[-1])
        window = torch.cat([window.to(x.dtype), x], dim=1)  # (B, k-1+T, 3Hd)
        # the window's first k-1 outputs see the kernel's zero padding: dropped
        q, k, v = self._heads(self._conv_silu(window)[:, k1:])  # (B, T, H, d)
        beta, g = self._gates(h, pad_mask)
        o, memory = self._rule(q, k, v, beta, g, memory)  # (B, T, H, d)
        return self._output(o), window[:, window.shape[1] - k1:].contiguous(), memory

    def step(self, h: torch.Tensor, window: torch.Tensor, memory: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token h (B, C) -> (B, C), the new window and S."""
        x = self.qkv_proj(h)
        window = torch.cat([window, x.to(window.dtype)[:, None]], dim=1)  # (B, k, 3Hd)
        qkv = (window * self.qkv_conv.weight[:, 0, :].T.to(window.dtype)).sum(dim=1)  # (B, 3Hd)
        q, k, v = self._heads(F.silu(qkv))  # (B, H, d)
        beta, g = self._gates(h, None)  # (B, H)
        o, memory = delta_rule_step(q, k, v, beta, g, memory)
        return self._output(o), window[:, 1:], memory


class GAMDeltaBlock(nn.Module):
    """GAM's block (same parameter names: ln1, causal_conv, memory_bank, gate, ln2, ffn) with
    the delta-rule memory ``delta`` as a third gated path."""

    def __init__(self, config: GAMDeltaConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        add_gam_paths(self, c)
        self.delta = DeltaRuleMemory(c)
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
