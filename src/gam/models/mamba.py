"""Mamba (Gu & Dao, 2023) baseline: the Mamba-1 selective-SSM mixer inside the shared LM shell.

One mixer (parameter names and shapes as in mamba-ssm's ``Mamba``, so its checkpoints map)::

    x, z   = in_proj(h).chunk(2)                 # (B, T, E) each, E = expand * d_model
    x      = silu(causal_depthwise_conv1d(x))    # kernel d_conv
    dt, B, C = x_proj(x).split(dt_rank, N, N)
    dt     = softplus(dt_proj(dt))               # (B, T, E), one step size per channel
    y      = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)   # includes * silu(z)
    out    = out_proj(y)

with the scan, per channel d and state n::

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t,    y_t = C_t . h_t + D x_t

Two ways to stack mixers (``MambaConfig.stacking``):

- ``"residual"`` (default, the ``mamba`` model): pre-norm residual blocks
  ``x = x + mixer(LayerNorm(x))`` as in mamba-ssm's own LM (which uses RMSNorm; LayerNorm here
  to match the shell's final norm and the GAM/Transformer blocks). ``out_proj`` is scaled by
  1/sqrt(n_layers) at init, as mamba-ssm does for pre-norm residual stacks. No FFN and no dropout
  inside the block, as in mamba-ssm; the shell's embedding dropout still applies.
- ``"paper"`` (the ``mamba-paper`` model): the bare stack ``x = mixer(x)`` of the GAM paper's
  baseline, no residual and no norm. It is kept because it is what the paper describes and its
  20.5M parameter count (tested) is only reached without norms. Without norms each mixer
  shrinks its input at init (a test shows the collapse) and the gate y * silu(z) makes it
  superlinear once trained, so the stack is unstable both ways (measurements in
  docs/design.md, "Mamba").

The scan comes three ways: ``selective_scan_reference`` (a sequential loop, the specification),
``selective_scan`` (the training path) and ``selective_scan_step`` (one token, for decoding).
``selective_scan`` dispatches to

- mamba-ssm's fused CUDA ``selective_scan_fn`` for CUDA tensors when ``mamba_ssm`` imports;
- on CPU, a C++ kernel compiled at first use (``gam.models.ops._scan_cpp``, about 2 s, cached): it
  walks the sequence once keeping the state of 64 channels in L1, fuses D u and the silu(z) gate,
  stores only chunk-boundary states and recomputes one chunk at a time in backward, so it never
  materialises (B, T, E, N). A second kernel does silu(causal conv) reading the in_proj output
  in place;
- otherwise (no compiler, ``GAM_SCAN_KERNEL=0``, other devices) a chunked parallel scan in
  PyTorch (Hillis-Steele inside chunks of ``chunk_size`` tokens, a Python loop over chunks)
  with a hand-written backward that recomputes a chunk at a time instead of storing.

All paths multiply only decays exp(dt A) <= 1 (dt > 0, A < 0); there is no exp(-cumsum)
division that could overflow when dt |A| is large (a test runs dt |A| up to 40 per step over
300 tokens). The scan runs in float32 even under bf16 autocast (inputs are cast up, autocast
is off inside), as mamba-ssm does; the decode state is float32.

Why a mixer of our own rather than a package: docs/design.md, "Mamba".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.lm import CausalLM, LMConfig
from gam.models.ops.conv import causal_conv_silu, causal_conv_step
from gam.models.ops.selective_scan import (
    selective_scan,
    selective_scan_step,
)

STACKINGS = ("residual", "paper")


@dataclass
class MambaConfig(LMConfig):
    """Mamba hyper-parameters; with the shell's defaults and ``stacking="paper"`` this is the
    paper's 20,504,576-parameter baseline (d_inner 1536, dt_rank 32)."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 3
    dt_rank: int | None = None  # None -> ceil(d_model / 16), as mamba-ssm's "auto"
    stacking: str = "residual"
    chunk_size: int = 64  # scan chunk: checkpoint interval of the kernel, block of the torch scan

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("d_state", "d_conv", "expand", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.dt_rank is not None and (isinstance(self.dt_rank, bool)
                                         or not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"dt_rank must be an integer >= 1 or None (auto), got "
                             f"{self.dt_rank!r}")
        if self.stacking not in STACKINGS:
            raise ValueError(f"unknown stacking {self.stacking!r}; expected one of {STACKINGS}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        """dt_rank with None resolved to ceil(d_model / 16)."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


# ---------------------------------------------------------------------------------- modules
class MambaState(NamedTuple):
    """Decode state of one mixer: ``conv`` (B, d_inner, d_conv - 1), the last d_conv - 1
    pre-convolution inputs, oldest first (zeros before the start); ``ssm`` (B, d_inner, d_state),
    the recurrent state in float32. O(1) in the context length."""

    conv: torch.Tensor
    ssm: torch.Tensor


def _s4d_real_log_a(d_inner: int, d_state: int) -> torch.Tensor:
    """log(1..N) for every channel: A = -exp(A_log) = -(1..N), S4D-real. (E, N)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


SCAN_FLOPS_PER_STATE = 9


class MambaMixer(nn.Module):
    """The Mamba-1 selective-SSM mixer with mamba-ssm's parameter names, shapes and init
    (paper size: 2,542,080 parameters)."""

    # the SSM's A and skip D are kept out of weight decay, as mamba-ssm does
    no_weight_decay_names: ClassVar[tuple[str, ...]] = ("A_log", "D")

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        d, e, n, r = c.d_model, c.d_inner, c.d_state, c.dt_rank_value
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        # padding is applied by hand (left only), so the convolution stays causal
        self.conv1d = nn.Conv1d(e, e, c.d_conv, groups=e, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self._init_dt_proj()
        # S4D-real init A = -(1..N) for every channel, stored as log so A stays negative
        self.A_log = nn.Parameter(_s4d_real_log_a(e, n))  # (E, N)
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d, bias=False)

    @torch.no_grad()
    def _init_dt_proj(self) -> None:
        # mamba-ssm's dt init: weight uniform +-r^-0.5; bias = softplus^-1(dt) for dt
        # log-uniform in [1e-3, 1e-1], so softplus(dt_proj(.)) starts in that range.
        r, e = self.config.dt_rank_value, self.config.d_inner
        nn.init.uniform_(self.dt_proj.weight, -r ** -0.5, r ** -0.5)
        dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @torch.no_grad()
    def reset_family_parameters(self) -> None:
        """dt_proj, A_log and D back to mamba-ssm's init (the construction's)."""
        self._init_dt_proj()
        self.A_log.copy_(_s4d_real_log_a(*self.A_log.shape))
        self.D.fill_(1.0)

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., E) -> delta (..., E), B (..., N), C (..., N), A (E, N)."""
        r, n = self.config.dt_rank_value, self.config.d_state
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)
        # softplus in float32 (as mamba-ssm's kernel does): bf16 would round small steps
        delta = F.softplus(self.dt_proj(dt).float())  # (..., E), > 0
        return delta, B, C, -torch.exp(self.A_log.float())

    def _mix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xi, z = self.in_proj(h).chunk(2, dim=-1)  # (B, T, E) each, views of one projection
        x = causal_conv_silu(xi, self.conv1d.weight, self.conv1d.bias)  # (B, T, E)
        delta, B, C, A = self._ssm_inputs(x)
        y, ssm = selective_scan(x, delta, A, B, C, self.D, z, self.config.chunk_size)
        return self.out_proj(y), xi, ssm  # (B, T, C)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._mix(h)[0]  # (B, T, C)

    def prefill(self, h: torch.Tensor) -> tuple[torch.Tensor, MambaState]:
        out, xi, ssm = self._mix(h)
        k = self.config.d_conv - 1
        conv = xi.transpose(1, 2)[:, :, max(0, xi.shape[1] - k):]  # (B, E, <= k)
        conv = F.pad(conv, (k - conv.shape[-1], 0))  # zeros stand for positions before 0
        return out, MambaState(conv.contiguous(), ssm)

    def step(self, h: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        xi, z = self.in_proj(h).chunk(2, dim=-1)  # (B, E) each
        x, conv = causal_conv_step(xi, state.conv, self.conv1d.weight, self.conv1d.bias,
                                   silu=True)  # (B, E), (B, E, d_conv - 1)
        delta, B, C, A = self._ssm_inputs(x)
        y, ssm = selective_scan_step(x, delta, A, B, C, self.D, state.ssm)  # (B, E)
        return self.out_proj(y * F.silu(z)), MambaState(conv, ssm)  # (B, C)


class MambaBlock(nn.Module):
    """``x + mixer(norm(x))`` (stacking "residual") or ``mixer(x)`` (stacking "paper")."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual = config.stacking == "residual"
        self.norm = nn.LayerNorm(config.d_model) if self.residual else None
        self.mixer = MambaMixer(config)
        self.n_layers = config.n_layers
        self._rescale_out_proj()

    @torch.no_grad()
    def _rescale_out_proj(self) -> None:
        if self.residual:  # mamba-ssm's rescale_prenorm_residual
            self.mixer.out_proj.weight.div_(math.sqrt(self.n_layers))

    def residual_projections(self) -> list[nn.Linear]:
        return [self.mixer.out_proj] if self.residual else []

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        """The selective scan: ``SCAN_FLOPS_PER_STATE * d_inner * d_state`` per token (the
        convention of mamba-ssm's FLOP counter: discretisation, input, state update, output)."""
        d_inner, d_state = self.mixer.A_log.shape
        return {"scan": float(SCAN_FLOPS_PER_STATE * d_inner * d_state)}

    def reset_family_parameters(self) -> None:
        """The mixer's SSM parameters, and out_proj's 1/sqrt(n_layers) on top of its Linear
        init (``init_weights`` has just reset it; gpt2 then replaces it as a residual
        projection)."""
        self.mixer.reset_family_parameters()
        self._rescale_out_proj()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x + self.mixer(self.norm(x))  # (B, T, C)
        return self.mixer(x)  # (B, T, C)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, MambaState]:
        if self.residual:
            y, state = self.mixer.prefill(self.norm(x))
            return x + y, state
        return self.mixer.prefill(x)

    # Decode state: a MambaState (conv inputs and SSM state), see MambaState.
    def step(self, x: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        if self.residual:
            y, state = self.mixer.step(self.norm(x), state)
            return x + y, state  # (B, C)
        return self.mixer.step(x, state)


class MambaLM(CausalLM):
    """The Mamba baseline: MambaBlocks in the shared shell (learned positions, tied head)."""

    config: MambaConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return MambaBlock(self.config)
