"""The diagonal state space layer of S4D (Gu, Goel, Gupta & Re, NeurIPS 2022, "On the
Parameterization and Initialization of Diagonal State Space Models"), three ways.

Per channel h (H channels) a continuous SSM with N/2 complex modes n, diagonal
A_n = -exp(log_A_real_n) + i A_imag_n (real part < 0 for any parameters), B = 1 (folded into
C), output C_n, and a step dt = exp(log_dt). Zero-order-hold discretisation gives, per mode::

    decay_n = exp(dt A_n)                  # |decay_n| < 1
    gain_n  = (exp(dt A_n) - 1) / A_n      # the ZOH input matrix B-bar (B = 1)
    x_t     = decay * x_{t-1} + gain * u_t           # (N/2,) complex state
    y_t     = 2 Re(sum_n C_n x_{t,n}) + D u_t

The factor 2 Re stands for the conjugate half of a real N-dimensional SSM: the modes come in
conjugate pairs, and only one of each pair is stored. Unrolled, y = K * u + D u, a causal
convolution with the kernel (a Vandermonde product)::

    K_l = 2 Re sum_n C_n gain_n decay_n^l = 2 Re sum_n C_n gain_n exp(dt A_n l),  l = 0..T-1

- ``s4d_conv``: the training path. The kernel for the input's length T (cost O(H N T), no
  batch dimension; decay^l is factored as decay^(b j) decay^i with b ~ sqrt(T), so that the
  kernel is two matmuls over the modes and no (H, N/2, T) tensor is built), then the
  convolution by FFT: both zero-padded to 2T so that the circular convolution is the linear
  (causal) one on its first T outputs, O(T log T) per channel.
- ``s4d_recurrent``: the recurrence above token by token, the specification the FFT path is
  tested against (values and gradients, float64).
- ``s4d_step``: one token, for cached decoding; ``s4d_final_state`` the state after a whole
  prompt (what prefill hands to the first step), from the same factored powers as the kernel.

Layout: u (B, T, H) as the blocks' (B, T, C); parameters log_dt (H,), log_A_real and A_imag
(H, N/2), C (H, N/2, 2) (real and imaginary parts, so that the parameter is real: optimizers,
dtype casts and checkpoints need no complex support), D (H,); state (B, H, N/2) complex.
Everything runs in float32 / complex64 with autocast off (float64 / complex128 for float64
inputs): under bf16 autocast the inputs are cast up, as cuFFT and the complex exponentials need,
and the output comes back in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

INITS = ("lin", "inv")


def s4d_a_init(channels: int, modes: int, init: str = "lin") -> tuple[torch.Tensor, torch.Tensor]:
    """``log_A_real`` and ``A_imag`` (channels, modes) of the S4D paper's inits, every channel
    alike: real part -1/2 (log(1/2)) and imaginary part ``pi n`` (S4D-Lin, Fourier-like
    frequencies) or ``N/pi (N/(2n+1) - 1)`` with N = 2 * modes (S4D-Inv, the asymptotics of the
    HiPPO-LegS eigenvalues), n = 0..modes-1."""
    if init not in INITS:
        raise ValueError(f"S4D init must be one of {INITS}, got {init!r}")
    n = torch.arange(modes, dtype=torch.float32)
    if init == "lin":
        imag = math.pi * n
    else:
        N = 2 * modes
        imag = N / math.pi * (N / (2 * n + 1) - 1)
    log_real = torch.full((channels, modes), math.log(0.5))
    return log_real, imag.repeat(channels, 1)


def s4d_log_dt_init(channels: int, dt_min: float = 1e-3, dt_max: float = 1e-1) -> torch.Tensor:
    """log dt ~ U[log dt_min, log dt_max] per channel (the S4 papers' 1e-3 and 1e-1)."""
    return torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


def s4d_c_init(channels: int, modes: int) -> torch.Tensor:
    """C ~ complex standard normal (real and imaginary parts N(0, 1/2) each), stored as
    (channels, modes, 2) real."""
    return torch.randn(channels, modes, 2) * math.sqrt(0.5)


class S4DModes(NamedTuple):
    """The discretised modes of every channel, (H, N/2) complex each: ``log_decay = dt A``
    (decay = exp(dt A)), ``gain`` (exp(dt A) - 1) / A, and ``output`` C."""

    log_decay: torch.Tensor
    gain: torch.Tensor
    output: torch.Tensor


def compute_dtype(u: torch.Tensor) -> torch.dtype:
    """float32 for bf16 / fp16 / float32 inputs, float64 for float64 ones."""
    return torch.promote_types(u.dtype, torch.float32)


def s4d_modes(log_dt: torch.Tensor, log_A_real: torch.Tensor, A_imag: torch.Tensor,
              C: torch.Tensor, dtype: torch.dtype = torch.float32) -> S4DModes:
    """ZOH discretisation in ``dtype`` (float32 -> complex64, float64 -> complex128)."""
    dt = torch.exp(log_dt.to(dtype))[:, None]  # (H, 1)
    A = torch.complex(-torch.exp(log_A_real.to(dtype)), A_imag.to(dtype))  # (H, N/2)
    dtA = dt * A
    gain = torch.expm1(dtA) / A
    return S4DModes(dtA, gain, torch.view_as_complex(C.to(dtype).contiguous()))


class _PowerBlocks(NamedTuple):
    """decay^l for l = 0..length-1 as two small factors, l = block * j + i:
    ``outer`` (H, J, N/2) = decay^(block j) and ``inner`` (H, N/2, block) = decay^i, with
    block = ceil(sqrt(length)) and J = ceil(length / block). decay^l is their product, so the
    (H, N/2, length) Vandermonde matrix is never materialised: the kernel and the prefill state
    become matmuls over the modes, with H N/2 (J + block) complex exponentials instead of
    H N/2 length (each factor is one exp, so decay^l stays exact to a few ulps)."""

    outer: torch.Tensor
    inner: torch.Tensor


def _complex_exp(z: torch.Tensor) -> torch.Tensor:
    """exp(z) = exp(Re z) (cos Im z + i sin Im z) from real element-wise ops, which are
    vectorised on CPU where torch's complex exp is not (3-5x faster there)."""
    magnitude = torch.exp(z.real)
    return torch.complex(magnitude * torch.cos(z.imag), magnitude * torch.sin(z.imag))


def _power_blocks(log_decay: torch.Tensor, length: int) -> _PowerBlocks:
    block = math.isqrt(length - 1) + 1 if length > 1 else 1  # ceil(sqrt(length))
    n_blocks = -(-length // block)
    real = log_decay.real.dtype
    i = torch.arange(block, device=log_decay.device, dtype=real)
    j = torch.arange(n_blocks, device=log_decay.device, dtype=real) * block
    outer = _complex_exp(log_decay[:, None, :] * j[:, None])  # (H, J, N/2)
    inner = _complex_exp(log_decay[..., None] * i)  # (H, N/2, block)
    return _PowerBlocks(outer, inner)


def s4d_kernel(modes: S4DModes, length: int) -> torch.Tensor:
    """K_l = 2 Re sum_n C_n gain_n decay_n^l for l < length: (H, length) real."""
    powers = _power_blocks(modes.log_decay, length)
    coef = (modes.output * modes.gain)[:, None, :] * powers.outer  # (H, J, N/2)
    # 2 Re(coef @ inner), the real part taken before the product: two real matmuls
    kernel = 2 * (coef.real @ powers.inner.real - coef.imag @ powers.inner.imag)  # (H, J, block)
    return kernel.flatten(1)[:, :length]


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{l<=t} kernel_l u_{t-l} per channel, by FFT: u (B, T, H), kernel (H, T) ->
    (B, T, H). Zero-padding both to 2T makes the circular convolution linear, so y_t reads
    only u_0..u_t (causal) and nothing wraps around."""
    T = u.shape[1]
    n = 2 * T
    u_f = torch.fft.rfft(u, n=n, dim=1)  # (B, T + 1, H)
    k_f = torch.fft.rfft(kernel, n=n, dim=-1).transpose(0, 1)  # (T + 1, H)
    return torch.fft.irfft(u_f * k_f, n=n, dim=1)[:, :T]  # (B, T, H)


def fft_conv_flops(seq_len: int, channels: int) -> float:
    """Forward FLOPs per token of ``fft_causal_conv`` on a (B, T, channels) input: per channel
    a real FFT of the input and an inverse real FFT of the product, both of length n = 2T at
    the radix-2 count 2.5 n log2 n each (half the complex FFT's 5 n log2 n), and T + 1 complex
    products of 6 FLOPs, shared by the T tokens: 10 log2(2T) + 6 (T + 1) / T, i.e. O(log T)
    per token. The kernel (its Vandermonde product and FFT) depends only on the weights and is
    computed once per forward whatever the batch, so it is not counted per token."""
    n = 2 * seq_len
    per_channel = 2 * 2.5 * n * math.log2(n) + 6 * (seq_len + 1)
    return channels * per_channel / seq_len


def s4d_conv(u: torch.Tensor, log_dt: torch.Tensor, log_A_real: torch.Tensor,
             A_imag: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The S4D layer's SSM, u (B, T, H) -> y (B, T, H): kernel for length T, FFT
    convolution, plus the skip D u. In float32 (float64 for float64 u), autocast off."""
    dtype = compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        modes = s4d_modes(log_dt, log_A_real, A_imag, C, dtype)
        u = u.to(dtype)
        kernel = s4d_kernel(modes, u.shape[1])  # (H, T)
        return fft_causal_conv(u, kernel) + u * D.to(dtype)  # (B, T, H)


def s4d_initial_state(batch: int, modes: S4DModes) -> torch.Tensor:
    """The zero state (B, H, N/2) before the first token."""
    return modes.gain.new_zeros(batch, *modes.gain.shape)


def _step(u_t: torch.Tensor, modes: S4DModes, decay: torch.Tensor, D: torch.Tensor,
          state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = decay * state + modes.gain * u_t[..., None]  # (B, H, N/2)
    y = 2 * (state * modes.output).sum(-1).real + D * u_t  # (B, H)
    return y, state


def s4d_step(u_t: torch.Tensor, log_dt: torch.Tensor, log_A_real: torch.Tensor,
             A_imag: torch.Tensor, C: torch.Tensor, D: torch.Tensor, state: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: u_t (B, H) and the state (B, H, N/2) after the previous token -> y_t (B, H)
    (compute dtype) and the new state."""
    dtype = compute_dtype(u_t)
    with torch.autocast(device_type=u_t.device.type, enabled=False):
        modes = s4d_modes(log_dt, log_A_real, A_imag, C, dtype)
        return _step(u_t.to(dtype), modes, torch.exp(modes.log_decay), D.to(dtype),
                     state.to(modes.gain.dtype))


def s4d_recurrent(u: torch.Tensor, log_dt: torch.Tensor, log_A_real: torch.Tensor,
                  A_imag: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token (the reference): u (B, T, H) -> y (B, T, H) and the
    state after the last token (B, H, N/2), starting from ``state`` (zeros if None)."""
    dtype = compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        modes = s4d_modes(log_dt, log_A_real, A_imag, C, dtype)
        decay, D = torch.exp(modes.log_decay), D.to(dtype)
        u = u.to(dtype)
        if state is None:
            state = s4d_initial_state(u.shape[0], modes)
        ys = []
        for t in range(u.shape[1]):
            y, state = _step(u[:, t], modes, decay, D, state)
            ys.append(y)
        return torch.stack(ys, dim=1), state


def s4d_final_state(u: torch.Tensor, log_dt: torch.Tensor, log_A_real: torch.Tensor,
                    A_imag: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The state after the last token of u (B, T, H), from zeros, in closed form:
    x_T = gain sum_l decay^l u_{T-1-l}: (B, H, N/2) complex."""
    dtype = compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        modes = s4d_modes(log_dt, log_A_real, A_imag, C, dtype)
        powers = _power_blocks(modes.log_decay, u.shape[1])
        n_blocks, block = powers.outer.shape[1], powers.inner.shape[2]
        newest_first = u.to(dtype).flip(1).transpose(1, 2)  # (B, H, T), lag l at index l
        lags = F.pad(newest_first, (0, n_blocks * block - u.shape[1]))  # zeros: before 0
        lags = lags.unflatten(-1, (n_blocks, block))  # (B, H, J, block)
        # sum over i of decay^i u_(lag block j + i), then over j of decay^(block j)
        within = torch.complex(torch.einsum("bhji,hni->bhjn", lags, powers.inner.real),
                               torch.einsum("bhji,hni->bhjn", lags, powers.inner.imag))
        return modes.gain * torch.einsum("hjn,bhjn->bhn", powers.outer, within)
