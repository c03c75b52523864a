"""RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution",
arXiv 2503.14456) in the shared LM shell: no attention, no learned positions; each block is a
time mix (a generalised delta-rule memory) and a channel mix (an FFN that sees the previous
token), pre-norm residual::

    x = LayerNorm_0(x)                           # first block only: RWKV's ln0 after the embedding
    x = x + TimeMix(LayerNorm_1(x))
    x = x + ChannelMix(LayerNorm_2(x))

Time mix, per token t (h the normalised input, h_{t-1} the previous token's, zeros before the
start; products element-wise; H heads of size N = d_model / n_heads)::

    x_c   = h_t + (h_{t-1} - h_t) * mu_c          for c in r, w, k, v, a, g (token shift)
    r, k, v = W_r x_r, W_k x_k, W_v x_v
    log w = -e^{-1/2} sigmoid(w0 + tanh(x_w W1) W2)          # decay w in (0.545, 1)
    a     = sigmoid(a0 + x_a A1 A2)                          # in-context learning rate
    v     = v + (v_first - v) * sigmoid(v0 + x_v V1 V2)      # layers > 0: value residual
    g     = sigmoid(x_g G1) G2                               # output gate (low rank)
    kk    = normalize(k * k_k) per head                      # removal key, unit norm
    k     = k * (1 + (a - 1) * k_a)
    S_t   = S_{t-1} (diag(w_t) - kk_t (kk_t * a_t)^T) + v_t k_t^T    # per head, S (N_v, N_k)
    y_t   = GroupNorm_H(S_t r_t) + (sum_head r * k * r_k) v          # per-head norm, bonus
    out   = W_o (y_t * g)

v_first is the first block's v (before any mix): the value residual that carries the first
layer's values to every later layer (the shell hands it from block to block through
``RWKV7LM``'s overrides of ``forward_blocks`` / ``prefill_blocks`` / ``step_blocks``; a block
called on its own uses its own v, for which the mix is the identity). The transpose
convention: S maps keys to values (rows = value channels, columns = key channels), read by
S r; the recurrence and its chunked form live in ``gam.models.ops.generalized_delta``.

Channel mix: ``x_k = h_t + (h_{t-1} - h_t) * mu_k``, ``W_v relu(W_k x_k)^2``, hidden
``ffn_mult * d_model``.

Sizes: LoRA ranks from the paper's formula (decay and a: 1.8 sqrt(d), value 1.3 sqrt(d), gate
0.6 d^0.8, rounded to a multiple of 32, at least 32; at d 768 it gives the 0.1B model's 64, 64,
32, 128; at d 512: 32, 32, 32, 96). Head size d_model / n_heads: 64 at the paper preset
(8 heads). The registered ``rwkv7`` uses a channel mix of hidden 3d (``ffn_mult=3``, the
paper's is 4d) so that the paper preset has 22,055,424 parameters under ``init="paper"``,
GAM's 22,599,680 - 2.4% (4d gives 25,201,152, +11.5%).

Initialisation (``reset_family_parameters``, kept in every init scheme but gpt2's residual
projections): the reference trainer's (BlinkDL/RWKV-LM, RWKV-v7/train_temp), which the paper
points to for it; see ``TimeMix.reset_parameters`` for the formulas. Deviations: the token
embedding and head keep the shell's scheme (the reference draws the embedding U(+-1e-4) and
the head orthogonally); dropout (the config's) is applied to both residual branches, as the
other families do; GroupNorm eps 64e-5 as the reference's head size 64.

Decoding is O(1) in the context: the state is the last normalised input of each mix (the token
shift) and the (N, N) matrix of every head (``RWKV7State``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.lm import CausalLM, LMConfig
from gam.models.ops.fused import Dropout
from gam.models.ops.generalized_delta import rwkv7_chunked, rwkv7_recurrent, rwkv7_step

RWKV7_IMPLS = ("chunked", "recurrent")
# the decay's bound: log w = -e^{-1/2} sigmoid(.) > -e^{-1/2}
DECAY_SCALE = math.exp(-0.5)
GROUP_NORM_EPS = 64e-5


def paper_lora_rank(d_model: int, factor: float, power: float) -> int:
    """The paper's LoRA size rule: factor * d^power rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * d_model ** power / 32) * 32))


@dataclass
class RWKV7Config(LMConfig):
    """RWKV-7 hyper-parameters. ``n_heads`` sets the head size d_model / n_heads (64 at the
    paper preset); the LoRA ranks default (None) to the paper's rule (``paper_lora_rank``);
    ``chunk_size`` is the chunked form's (32 keeps every factor below e^10, see
    ``ops.generalized_delta``); ``rwkv7_impl="recurrent"`` trains with the token-by-token
    reference instead."""

    pos_embedding: bool = False
    n_heads: int = 8
    decay_lora: int | None = None
    rate_lora: int | None = None
    value_lora: int | None = None
    gate_lora: int | None = None
    chunk_size: int = 32
    rwkv7_impl: str = "chunked"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_heads", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("decay_lora", "rate_lora", "value_lora", "gate_lora"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None (the paper's rule), "
                                 f"got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads "
                             f"{self.n_heads}")
        if self.rwkv7_impl not in RWKV7_IMPLS:
            raise ValueError(f"rwkv7_impl must be one of {RWKV7_IMPLS}, got "
                             f"{self.rwkv7_impl!r}")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    def lora_ranks(self) -> dict[str, int]:
        """The four LoRA ranks, None resolved with the paper's rule."""
        d = self.d_model
        rule = {"decay_lora": (1.8, 0.5), "rate_lora": (1.8, 0.5), "value_lora": (1.3, 0.5),
                "gate_lora": (0.6, 0.8)}
        return {name: getattr(self, name) or paper_lora_rank(d, *fp)
                for name, fp in rule.items()}


class RWKV7State(NamedTuple):
    """Decode state of one block, O(1) in the context length:

    - ``att_shift`` (B, C): the time mix's last normalised input (its token shift);
    - ``ffn_shift`` (B, C): the channel mix's last normalised input;
    - ``wkv`` (B, H, N, N): every head's state S (value rows, key columns), float32 (float64
      for float64 models).
    """

    att_shift: torch.Tensor
    ffn_shift: torch.Tensor
    wkv: torch.Tensor


def _float32_or_more(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _shifted(h: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """The previous token's h for every position of h (B, T, C): ``last`` (B, C) before the
    first (zeros at the start of a sequence)."""
    first = h.new_zeros(h[:, :1].shape) if last is None else last[:, None].to(h.dtype)
    return torch.cat([first, h[:, :-1]], dim=1)  # (B, T, C)


def _lora_parameters(d_model: int, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    first = nn.Parameter(torch.empty(d_model, rank))
    second = nn.Parameter(torch.empty(rank, d_model))
    return first, second


def _orthogonal(t: torch.Tensor, scale: float) -> None:
    """Orthogonal init with the reference's gain (sqrt(rows / cols) when taller than wide)."""
    rows, cols = t.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    nn.init.orthogonal_(t, gain=gain * scale)


class TimeMix(nn.Module):
    """The time mix (see the module docstring); layer 0 has no value-residual LoRA."""

    def __init__(self, config: RWKV7Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        d, H = c.d_model, c.n_heads
        self.n_heads, self.head_size = H, c.head_size
        ranks = c.lora_ranks()
        # token-shift interpolation, one coefficient per channel and branch
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.empty(d)))
        self.w0 = nn.Parameter(torch.empty(d))
        self.w1, self.w2 = _lora_parameters(d, ranks["decay_lora"])
        self.a0 = nn.Parameter(torch.empty(d))
        self.a1, self.a2 = _lora_parameters(d, ranks["rate_lora"])
        self.v0 = self.v1 = self.v2 = None
        if layer_idx > 0:
            self.v0 = nn.Parameter(torch.empty(d))
            self.v1, self.v2 = _lora_parameters(d, ranks["value_lora"])
        self.g1, self.g2 = _lora_parameters(d, ranks["gate_lora"])
        self.k_k = nn.Parameter(torch.empty(d))  # removal-key scale
        self.k_a = nn.Parameter(torch.empty(d))  # how much a scales the written key
        self.r_k = nn.Parameter(torch.empty(H, self.head_size))  # bonus weights
        # the reference keeps the LoRA matrices and r_k out of weight decay (not ".weight"
        # parameters); read by flagged_no_weight_decay
        lora = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
        self.no_weight_decay_names: tuple[str, ...] = tuple(
            n for n in lora if getattr(self, n) is not None) + ("r_k",)
        self.receptance = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        self.ln_x = nn.GroupNorm(H, d, eps=GROUP_NORM_EPS)
        self.reset_family_parameters()

    @torch.no_grad()
    def reset_family_parameters(self) -> None:
        """The reference trainer's init, with l = layer index, L = n_layers, d = d_model,
        i = channel index, n = i mod N (position in the head)::

            mu_c   = 1 - (i / d)^(p_c (1 - l / L)),  p = 0.2 (r, g), 0.9 (w, a), 0.7 (k, v)
            w0     = -6 + 6 (i / (d-1))^(1 + (l / (L-1))^0.3) + 0.5 + 2.5 z_n,
            a0     = -0.19 + 0.3 z_n + 0.4 lin_i,   v0 = 0.73 - 0.4 lin_i
            z_n    = s |s|, s = (n - (N-1)/2) / ((N-1)/2)  (zigzag),  lin_i = i / (d-1) - 0.5
            k_k    = 0.71 - 0.1 lin_i,  k_a = 1.02,  r_k = -0.04
            LoRA: first matrix 0, second orthogonal with gain 0.1
            W_r, W_v ~ U(+-0.5 / sqrt(d)), W_k ~ U(+-0.05 / sqrt(d)), W_o = 0, GroupNorm 1 / 0
        """
        c, d, N = self.config, self.config.d_model, self.head_size
        L, layer = c.n_layers, self.layer_idx
        depth_0_to_1 = layer / (L - 1) if L > 1 else 0.0
        depth_1_to_0 = 1.0 - layer / L
        i = torch.arange(d, dtype=torch.float64)
        ddd = i / d
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7),
                            ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1.0 - ddd ** (power * depth_1_to_0))
        lin = i / max(d - 1, 1) - 0.5
        half = max((N - 1) / 2, 0.5)
        s = ((i % N) - (N - 1) / 2) / half
        zigzag = s * s.abs()
        decay = -6 + 6 * (i / max(d - 1, 1)) ** (1 + depth_0_to_1 ** 0.3)
        self.w0.copy_(decay + 0.5 + 2.5 * zigzag)
        self.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * lin)
        if self.v0 is not None:
            self.v0.copy_(0.73 - 0.4 * lin)
        for first, second in ((self.w1, self.w2), (self.a1, self.a2), (self.v1, self.v2),
                              (self.g1, self.g2)):
            if first is not None:
                first.zero_()
                _orthogonal(second, 0.1)
        self.k_k.copy_(0.71 - 0.1 * lin)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        bound = d ** -0.5
        nn.init.uniform_(self.receptance.weight, -0.5 * bound, 0.5 * bound)
        nn.init.uniform_(self.key.weight, -0.05 * bound, 0.05 * bound)
        nn.init.uniform_(self.value.weight, -0.5 * bound, 0.5 * bound)
        nn.init.zeros_(self.output.weight)
        self.ln_x.reset_parameters()

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> float:
        """Forward FLOPs per token of the chunked form's matmuls, per head with chunk
        C = min(chunk size, seq_len) and N = head size: the four (C x C) products (alpha beta^T,
        alpha k^T, r beta^T, r k^T), A_ak V, T applied to it and to alpha, A_rb P and A_rk V
        (9 x 2CN, all triangular: ``causal_halved`` counts half), and the four state products
        W S^T, r S^T, P^T beta, V^T k (4 x 2N^2). The (C x C) triangular inverse is not
        counted."""
        C = min(self.config.chunk_size, seq_len)
        N = self.head_size
        pairwise = 9 * 2 * C * N / (2 if causal_halved else 1)
        return float(self.n_heads * (pairwise + 4 * 2 * N * N))

    def _rule(self, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kk: torch.Tensor, a: torch.Tensor, wkv: torch.Tensor | None, mode: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == "step":  # one token: (B, 1, H, N) -> rwkv7_step on (B, H, N)
            y, wkv = rwkv7_step(r[:, 0], log_w[:, 0], k[:, 0], v[:, 0], kk[:, 0], a[:, 0], wkv)
            return y[:, None], wkv
        if mode == "reference" or self.config.rwkv7_impl == "recurrent":
            return rwkv7_recurrent(r, log_w, k, v, kk, a, wkv)
        return rwkv7_chunked(r, log_w, k, v, kk, a, wkv, self.config.chunk_size)

    def forward(self, h: torch.Tensor, h_prev: torch.Tensor, v_first: torch.Tensor | None,
                wkv: torch.Tensor | None = None, mode: str = "chunked"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h, h_prev (B, T, C) -> output (B, T, C), v_first (B, T, C) and the new state S.
        ``v_first`` None: this block's own values (the first layer's are returned)."""
        B, T, C = h.shape
        H, N = self.n_heads, self.head_size
        dtype = _float32_or_more(h)
        shift = h_prev - h
        xr, xw, xk, xv, xa, xg = (torch.addcmul(h, shift, getattr(self, name).to(h.dtype))
                                  for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r = self.receptance(xr).to(dtype)
        k = self.key(xk).to(dtype)
        v = self.value(xv).to(dtype)
        # the decay, rate and residual mix in float32: bf16 would round the gates near 0 and 1
        log_w = -DECAY_SCALE * torch.sigmoid(
            self.w0.to(dtype) + (torch.tanh(xw @ self.w1) @ self.w2).to(dtype))
        if v_first is None:
            v_first = v
        elif self.v0 is not None:
            mix = torch.sigmoid(self.v0.to(dtype) + ((xv @ self.v1) @ self.v2).to(dtype))
            v = v + (v_first.to(dtype) - v) * mix
        a = torch.sigmoid(self.a0.to(dtype) + ((xa @ self.a1) @ self.a2).to(dtype))
        g = torch.sigmoid(xg @ self.g1) @ self.g2  # (B, T, C)
        kk = F.normalize((k * self.k_k.to(dtype)).view(B, T, H, N), dim=-1)
        k = k * (1 + (a - 1) * self.k_a.to(dtype))
        r, k, v, a, log_w = (t.view(B, T, H, N) for t in (r, k, v, a, log_w))
        y, wkv = self._rule(r, log_w, k, v, kk, a, wkv, mode)  # (B, T, H, N)
        y = F.group_norm(y.reshape(B * T, C), H, self.ln_x.weight.to(dtype),
                         self.ln_x.bias.to(dtype), self.ln_x.eps).view(B, T, H, N)
        bonus = (r * k * self.r_k.to(dtype)).sum(dim=-1, keepdim=True) * v  # (B, T, H, N)
        out = self.output(((y + bonus).flatten(-2) * g).to(h.dtype))  # (B, T, C)
        return out, v_first, wkv


class ChannelMix(nn.Module):
    """``W_v relu(W_k (h + (h_prev - h) * mu_k))^2``, hidden ffn_mult * d_model."""

    def __init__(self, config: RWKV7Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.x_k = nn.Parameter(torch.empty(c.d_model))
        self.key = nn.Linear(c.d_model, c.ffn_mult * c.d_model, bias=False)
        self.value = nn.Linear(c.ffn_mult * c.d_model, c.d_model, bias=False)
        self.reset_family_parameters()

    @torch.no_grad()
    def reset_family_parameters(self) -> None:
        """mu_k = 1 - (i / d)^((1 - l / L)^4), W_k ~ U(+-0.5 / sqrt(d)), W_v = 0 (the
        reference's)."""
        d = self.config.d_model
        depth_1_to_0 = 1.0 - self.layer_idx / self.config.n_layers
        i = torch.arange(d, dtype=torch.float64)
        self.x_k.copy_(1.0 - (i / d) ** (depth_1_to_0 ** 4))
        bound = 0.5 * d ** -0.5
        nn.init.uniform_(self.key.weight, -bound, bound)
        nn.init.zeros_(self.value.weight)

    def forward(self, h: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(h, h_prev - h, self.x_k.to(h.dtype))
        return self.value(torch.relu(self.key(x)).square())  # (B, T, C)


class RWKV7Block(nn.Module):
    """ln0 (first block only), then x + TimeMix(ln1(x)), x + ChannelMix(ln2(x)), each branch
    through the config's dropout. ``forward`` / ``prefill`` / ``step`` are the shell's
    interface (the block's own values stand in for v_first); the ``*_values`` forms take and
    return the first layer's values."""

    def __init__(self, config: RWKV7Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.ln0 = nn.LayerNorm(c.d_model) if layer_idx == 0 else None
        self.ln1 = nn.LayerNorm(c.d_model)
        self.att = TimeMix(c, layer_idx)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.ffn = ChannelMix(c, layer_idx)
        self.dropout = Dropout(c.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.att.output, self.ffn.value]

    def reset_family_parameters(self) -> None:
        self.att.reset_family_parameters()
        self.ffn.reset_family_parameters()

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        return {"recurrence": self.att.mixing_flops(seq_len, causal_halved)}

    def run(self, x: torch.Tensor, v_first: torch.Tensor | None, state: RWKV7State | None,
            mode: str = "chunked") -> tuple[torch.Tensor, torch.Tensor, RWKV7State]:
        """T tokens x (B, T, C) after ``state`` (None: the start) -> output (B, T, C), v_first
        and the state after them. ``mode``: "chunked" (the config's impl), "reference" (the
        recurrence) or "step" (T = 1, ``rwkv7_step``)."""
        if self.ln0 is not None:
            x = self.ln0(x)
        h = self.ln1(x)  # (B, T, C)
        y, v_first, wkv = self.att(h, _shifted(h, None if state is None else state.att_shift),
                                   v_first, None if state is None else state.wkv, mode)
        x = self.dropout(y, x)
        h2 = self.ln2(x)
        x = self.dropout(self.ffn(h2, _shifted(h2, None if state is None
                                               else state.ffn_shift)), x)
        return x, v_first, RWKV7State(h[:, -1], h2[:, -1], wkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, None, None)[0]

    def forward_reference(self, x: torch.Tensor, v_first: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token-by-token recurrence instead of the chunked form: to test against."""
        x, v_first, _ = self.run(x, v_first, None, mode="reference")
        return x, v_first

    # Decode state: an RWKV7State (both token shifts and every head's S), see RWKV7State.
    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, RWKV7State]:
        x, _, state = self.run(x, None, None)
        return x, state

    def step(self, x: torch.Tensor, state: RWKV7State) -> tuple[torch.Tensor, RWKV7State]:
        x, _, state = self.run(x[:, None], None, state, mode="step")
        return x[:, 0], state


class RWKV7LM(CausalLM):
    """RWKV-7: RWKV7Blocks in the shared shell, no learned positions. The blocks' passes carry
    the first block's values (v_first) to the later blocks (value residual)."""

    config: RWKV7Config

    def make_block(self, layer_idx: int) -> nn.Module:
        return RWKV7Block(self.config, layer_idx)

    def forward_blocks(self, x: torch.Tensor, output_all: bool = False
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        all_states, v_first = [], None
        for block in self.blocks:
            if output_all:
                all_states.append(x)
            x, v_first, _ = block.run(x, v_first, None)  # (B, T, C)
        if output_all:
            all_states.append(x)
        return x, all_states

    def forward_reference(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) through the token-by-token recurrence: to test against."""
        x, v_first = self.embed(idx), None
        for block in self.blocks:
            x, v_first = block.forward_reference(x, v_first)
        return self.head(self.ln_f(x))

    def prefill_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        states, v_first = [], None
        for block in self.blocks:
            x, v_first, state = block.run(x, v_first, None)  # (B, T, C)
            states.append(state)
        return x, states

    def step_blocks(self, x: torch.Tensor, layers: list[Any]) -> torch.Tensor:
        x, v_first = x[:, None], None  # (B, 1, C): one token
        for i, block in enumerate(self.blocks):
            x, v_first, layers[i] = block.run(x, v_first, layers[i], mode="step")
        return x[:, 0]  # (B, C)
