"""S4D (Gu, Goel, Gupta & Re, NeurIPS 2022, "On the Parameterization and Initialization of
Diagonal State Space Models") in the shared LM shell.

Each block is the S4 papers' language-model layer pair, pre-norm residual::

    y = S4D(LayerNorm(x))                  # (B, T, C): per channel a diagonal SSM, y = K * u + D u
    x = x + dropout(GLU(Linear(C, 2C)(gelu(y))))
    x = x + FFN(LayerNorm(x))              # the shell's FeedForward: 4C, GELU, dropout

The SSM of channel h has N/2 complex modes (``state_size`` N, the real state size) with
A = -exp(log_A_real) + i A_imag, a step dt = exp(log_dt) and output C (B = 1), discretised by
zero-order hold; ``gam.models.ops.s4d_kernel`` holds the equations, the FFT convolution that
trains in O(T log T) and the recurrence that decodes with an O(1) state. Init (the paper's):
A from S4D-Lin (-1/2 + i pi n) or S4D-Inv (``a_init``), log dt ~ U[log 1e-3, log 1e-1] per
channel, C complex standard normal, D ~ N(0, 1).

Optimizer: the S4 papers train the SSM's A (log_A_real, A_imag) and step (log_dt) with a
smaller learning rate, min(lr, 1e-3), and no weight decay, for stability. ``ssm_lr`` (default
1e-3, the papers') gives them that through the layer's ``optimizer_hints()``: their own
optimizer group, weight decay 0 and peak learning rate ``min(lr, ssm_lr)``, following the
run's warm-up + cosine scaled by ``min(lr, ssm_lr) / lr``. ``ssm_lr=None``: they train as
every other parameter (listed in ``no_weight_decay_names``, which only
``decay_filter="nanogpt"`` honours). C and D are ordinary parameters either way.

No learned positions (``pos_embedding=False``): the convolution kernel is already a function of
the relative position. The receptive field is the whole context (max_seq_len).

Choices and the paper-size configuration (N = 256, 22,462,464 parameters, GAM - 0.6%):
docs/design.md, "S4D".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.blocks import FeedForward, OptimizerHint
from gam.models.lm import CausalLM, LMConfig
from gam.models.ops.fused import Dropout
from gam.models.ops.s4d_kernel import (
    INITS,
    fft_conv_flops,
    s4d_a_init,
    s4d_c_init,
    s4d_conv,
    s4d_final_state,
    s4d_log_dt_init,
    s4d_step,
)


@dataclass
class S4DConfig(LMConfig):
    """S4D hyper-parameters. ``state_size`` is the paper's N (N/2 complex modes per channel);
    256 puts the paper preset at 22,462,464 parameters, GAM's 22,599,680 - 0.6% (the S4D
    paper's usual N = 64 gives 21,282,816, - 5.8%). ``a_init``: ``"lin"`` (S4D-Lin) or
    ``"inv"`` (S4D-Inv). ``dt_min`` / ``dt_max``: the range of the log-uniform initial step.
    ``ssm_lr``: the cap on the peak learning rate of log_A_real, A_imag and log_dt, which also
    get no weight decay (1e-3, the S4 papers'; None: trained as every other parameter)."""

    # a config recorded before ssm_lr existed trained the SSM parameters as the others
    LEGACY: ClassVar[dict[str, Any]] = {**LMConfig.LEGACY, "ssm_lr": None}

    pos_embedding: bool = False
    state_size: int = 256
    a_init: str = "lin"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    ssm_lr: float | None = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.state_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
            raise ValueError(f"state_size must be an even integer >= 2 (N/2 complex modes), "
                             f"got {n!r}")
        if self.a_init not in INITS:
            raise ValueError(f"a_init must be one of {INITS}, got {self.a_init!r}")
        lo, hi = self.dt_min, self.dt_max
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))
                and 0 < lo <= hi):
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got "
                             f"{lo!r} and {hi!r}")
        r = self.ssm_lr
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                              or not math.isfinite(r) or r <= 0):
            raise ValueError(f"ssm_lr must be a positive number, or None to train the SSM "
                             f"parameters as the others, got {r!r}")


class S4DLayer(nn.Module):
    """The diagonal SSM of every channel, h (B, T, C) -> (B, T, C) in float32 (float64 for
    float64 models). Parameters: log_dt (C,), log_A_real and A_imag (C, N/2), C (C, N/2, 2)
    (real, imaginary), D (C,)."""

    # the SSM's A and step, kept out of weight decay by the nanogpt filter when not hinted
    no_weight_decay_names: ClassVar[tuple[str, ...]] = ("log_dt", "log_A_real", "A_imag")

    def __init__(self, config: S4DConfig) -> None:
        super().__init__()
        self.config = config
        H, modes = config.d_model, config.state_size // 2
        self.log_dt = nn.Parameter(torch.empty(H))
        self.log_A_real = nn.Parameter(torch.empty(H, modes))
        self.A_imag = nn.Parameter(torch.empty(H, modes))
        self.C = nn.Parameter(torch.empty(H, modes, 2))
        self.D = nn.Parameter(torch.empty(H))
        self.reset_family_parameters()

    @torch.no_grad()
    def reset_family_parameters(self) -> None:
        """The S4D paper's init (see the module docstring)."""
        c = self.config
        H, modes = self.A_imag.shape
        log_real, imag = s4d_a_init(H, modes, c.a_init)
        self.log_A_real.copy_(log_real)
        self.A_imag.copy_(imag)
        self.log_dt.copy_(s4d_log_dt_init(H, c.dt_min, c.dt_max))
        self.C.copy_(s4d_c_init(H, modes))
        self.D.copy_(torch.randn(H))

    def optimizer_hints(self) -> dict[str, OptimizerHint]:
        """log_dt, log_A_real and A_imag: peak learning rate at most ``ssm_lr``, no weight
        decay (none when ``ssm_lr`` is None)."""
        if self.config.ssm_lr is None:
            return {}
        hint = OptimizerHint(lr_max=self.config.ssm_lr, weight_decay=0.0)
        return dict.fromkeys(("log_dt", "log_A_real", "A_imag"), hint)

    def _ssm(self) -> tuple[torch.Tensor, ...]:
        return self.log_dt, self.log_A_real, self.A_imag, self.C

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return s4d_conv(h, *self._ssm(), self.D)  # (B, T, C)

    def prefill(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(h), s4d_final_state(h, *self._ssm())

    def step(self, h: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return s4d_step(h, *self._ssm(), self.D, state)  # (B, C), (B, C, N/2)


class S4DBlock(nn.Module):
    """``x + dropout(GLU(out_proj(gelu(S4D(ln1(x))))))``, then ``x + FFN(ln2(x))``."""

    def __init__(self, config: S4DConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.ssm = S4DLayer(config)
        self.out_proj = nn.Linear(d, 2 * d)  # the GLU's value and gate halves
        self.resid_dropout = Dropout(config.dropout)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, config.ffn_mult, config.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.out_proj, self.ffn.fc2]

    def mixing_flops(self, seq_len: int, causal_halved: bool = False) -> dict[str, float]:
        """The FFT convolution of every channel, O(log T) per token
        (``s4d_kernel.fft_conv_flops``); the FFT computes the full circular product, so
        ``causal_halved`` changes nothing."""
        return {"ssm": fft_conv_flops(seq_len, self.ssm.D.shape[0])}

    def reset_family_parameters(self) -> None:
        self.ssm.reset_family_parameters()

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x plus the SSM output y after GELU, the GLU projection and the dropout."""
        y = F.gelu(y).to(x.dtype)  # the SSM runs in float32; a bf16 model's Linear wants bf16
        return self.resid_dropout(F.glu(self.out_proj(y), dim=-1), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._mix(x, self.ssm(self.ln1(x)))  # (B, T, C)
        return self.ffn(self.ln2(x), x)

    # Decode state: the SSM state after the last token, (B, C, N/2) complex (complex64;
    # complex128 for float64 models), O(1) in the context length.
    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.ssm.prefill(self.ln1(x))
        x = self._mix(x, y)
        return self.ffn(self.ln2(x), x), state

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.ssm.step(self.ln1(x), state)  # (B, C)
        x = self._mix(x, y)
        return self.ffn(self.ln2(x), x), state


class S4DLM(CausalLM):
    """S4D blocks in the shared shell (no learned positions)."""

    config: S4DConfig

    def make_block(self, layer_idx: int) -> nn.Module:
        return S4DBlock(self.config)
