"""The S4D ops (``gam.models.ops.s4d_kernel``): the FFT convolution path against the token-by-
token recurrence in float64 (values and gradients), the closed-form prefill state, causality,
bf16 autocast, the inits and the FLOP formula."""

import math

import pytest
import torch

from gam.models.ops.s4d_kernel import (
    fft_causal_conv,
    fft_conv_flops,
    s4d_a_init,
    s4d_c_init,
    s4d_conv,
    s4d_final_state,
    s4d_kernel,
    s4d_log_dt_init,
    s4d_modes,
    s4d_recurrent,
    s4d_step,
)

B, T, H, MODES = 2, 37, 3, 5  # T not a power of two, several channels


def _params(init, dtype=torch.float64, seed=0, dt_max=1e-1):
    torch.manual_seed(seed)
    log_real, imag = s4d_a_init(H, MODES, init)
    log_real = log_real + 0.3 * torch.randn(H, MODES)  # channels and modes all differ
    imag = imag + 0.1 * torch.randn(H, MODES)
    params = [s4d_log_dt_init(H, dt_max=dt_max), log_real, imag, s4d_c_init(H, MODES),
              torch.randn(H)]
    return [p.to(dtype).requires_grad_() for p in params]


def _grads(y, inputs, weight):
    return torch.autograd.grad((y * weight).sum(), inputs)


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_fft_path_equals_recurrence_values_and_gradients(init):
    params = _params(init)
    u = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    fast = s4d_conv(u, *params)
    ref, _ = s4d_recurrent(u, *params)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    weight = torch.randn_like(ref)
    for g_fast, g_ref in zip(_grads(fast, [u, *params], weight),
                             _grads(ref, [u, *params], weight), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-11)


def test_fft_path_gradcheck():
    params = _params("lin")
    u = torch.randn(1, 11, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: s4d_conv(*a), (u, *params), fast_mode=True)


@pytest.mark.parametrize("length", [1, 2, 16, 17, T])  # the power blocks' edge cases
def test_kernel_and_final_state_at_every_length(length):
    params = [p.detach() for p in _params("inv")]
    impulse = torch.zeros(1, length, H, dtype=torch.float64)
    impulse[:, 0] = 1.0
    response, _ = s4d_recurrent(impulse, *params[:4], torch.zeros(H, dtype=torch.float64))
    kernel = s4d_kernel(s4d_modes(*params[:4], dtype=torch.float64), length)  # (H, length)
    torch.testing.assert_close(kernel.T, response[0], rtol=0, atol=1e-13)
    u = torch.randn(B, length, H, dtype=torch.float64)
    _, state = s4d_recurrent(u, *params)
    torch.testing.assert_close(s4d_final_state(u, *params[:4]), state, rtol=0, atol=1e-13)


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_final_state_and_steps_continue_the_recurrence(init):
    params = [p.detach() for p in _params(init)]
    u = torch.randn(B, T, H, dtype=torch.float64)
    ref, state = s4d_recurrent(u, *params)
    prefix = 20
    closed = s4d_final_state(u[:, :prefix], *params[:4])
    _, state_prefix = s4d_recurrent(u[:, :prefix], *params)
    assert closed.dtype == torch.complex128 and closed.shape == (B, H, MODES)
    torch.testing.assert_close(closed, state_prefix, rtol=0, atol=1e-13)
    for t in range(prefix, T):
        y, closed = s4d_step(u[:, t], *params, closed)
        torch.testing.assert_close(y, ref[:, t], rtol=0, atol=1e-12)
    torch.testing.assert_close(closed, state, rtol=0, atol=1e-12)


def test_fft_convolution_is_causal_and_linear():
    torch.manual_seed(1)
    u = torch.randn(B, T, H, dtype=torch.float64)
    kernel = torch.randn(H, T, dtype=torch.float64)
    y = fft_causal_conv(u, kernel)
    direct = torch.stack([sum(kernel[:, lag] * u[:, t - lag] for lag in range(t + 1))
                          for t in range(T)], dim=1)
    torch.testing.assert_close(y, direct, rtol=0, atol=1e-12)
    changed = u.clone()
    changed[:, 15:] = torch.randn(B, T - 15, H, dtype=torch.float64)
    torch.testing.assert_close(fft_causal_conv(changed, kernel)[:, :15], y[:, :15], rtol=0,
                               atol=1e-13)


def test_large_steps_stay_finite():
    # dt up to 10 and |A_imag| up to pi * (MODES - 1): |decay| <= exp(-dt/2) <= 1, no overflow
    params = [p.detach() for p in _params("lin", dt_max=10.0)]
    u = torch.randn(B, 300, H, dtype=torch.float64)
    fast = s4d_conv(u, *params)
    ref, _ = s4d_recurrent(u, *params)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)


def test_bf16_autocast_runs_in_float32():
    params = [p.detach().float() for p in _params("lin")]
    u = torch.randn(B, T, H)
    fp32 = s4d_conv(u, *params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = s4d_conv(u.bfloat16(), *params)
        y, state = s4d_step(u[:, 0].bfloat16(), *params,
                            torch.zeros(B, H, MODES, dtype=torch.complex64))
    assert out.dtype == torch.float32 and y.dtype == torch.float32
    assert state.dtype == torch.complex64
    # only the input was rounded to bf16 (relative 2^-8)
    assert (out - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_inits():
    log_real, imag = s4d_a_init(4, 32, "lin")
    assert torch.equal(log_real, torch.full((4, 32), math.log(0.5)))
    torch.testing.assert_close(imag[2], math.pi * torch.arange(32.0))
    _, inv = s4d_a_init(4, 32, "inv")
    n = torch.arange(32.0)
    torch.testing.assert_close(inv[1], 64 / math.pi * (64 / (2 * n + 1) - 1))
    assert (inv[0, :-1] > inv[0, 1:]).all()  # decreasing frequencies, largest 64/pi * 63
    with pytest.raises(ValueError, match="S4D init"):
        s4d_a_init(4, 32, "legs")
    torch.manual_seed(0)
    log_dt = s4d_log_dt_init(20000)
    assert log_dt.min() >= math.log(1e-3) and log_dt.max() <= math.log(1e-1)
    assert abs(log_dt.mean().item() - (math.log(1e-3) + math.log(1e-1)) / 2) < 0.05
    C = s4d_c_init(100, 100)
    for part in (C[..., 0], C[..., 1]):  # complex standard normal: variance 1/2 each part
        assert abs(part.var().item() - 0.5) < 0.03


def test_fft_conv_flops_grow_as_log_t():
    f256, f512 = fft_conv_flops(256, 1), fft_conv_flops(512, 1)
    assert f256 == pytest.approx(10 * math.log2(512) + 6 * 257 / 256)
    assert f512 - f256 == pytest.approx(10 + 6 / 512 - 6 / 256)  # + 10 per doubling of T
    assert fft_conv_flops(256, 7) == pytest.approx(7 * f256)


def test_discretisation_is_zero_order_hold():
    """gain = integral_0^dt exp(A s) ds (a constant input over one step), decay = exp(dt A)."""
    params = [p.detach() for p in _params("inv")]
    modes = s4d_modes(*params[:4], dtype=torch.float64)
    dt = torch.exp(params[0])[:, None]  # (H, 1)
    A = torch.complex(-torch.exp(params[1]), params[2])
    s = torch.linspace(0, 1, 20001, dtype=torch.float64)  # s / dt
    integrand = torch.exp(A[..., None] * dt[..., None] * s) * dt[..., None]  # (H, M, S)
    integral = torch.trapezoid(integrand, s, dim=-1)
    torch.testing.assert_close(modes.gain, integral, rtol=1e-7, atol=0)
    torch.testing.assert_close(torch.exp(modes.log_decay), torch.exp(dt * A))
