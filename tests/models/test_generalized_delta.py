"""RWKV-7's generalised delta rule: chunked (training path) and one-token step against the
token-by-token recurrence."""

import pytest
import torch
import torch.nn.functional as F

from gam.models.ops.generalized_delta import rwkv7_chunked, rwkv7_recurrent, rwkv7_step

# tiny tensors: one thread (the shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

RWKV7_DECAY = 0.6065  # e^{-1/2}: the strongest per-token log-decay the model can produce


def _inputs(B=2, T=37, H=3, dk=6, dv=5, dtype=torch.float64, seed=0, strength=RWKV7_DECAY):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    log_decay = -strength * torch.rand(B, T, H, dk, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)
    kk = F.normalize(torch.randn(B, T, H, dk, generator=g, dtype=dtype), dim=-1)
    a = torch.rand(B, T, H, dk, generator=g, dtype=dtype)
    state = torch.randn(B, H, dv, dk, generator=g, dtype=dtype)
    return r, log_decay, k, v, kk, a, state


# (T, chunk): not a multiple of the chunk, shorter than it, several exact chunks, chunk 1
@pytest.mark.parametrize("T, chunk", [(37, 8), (5, 64), (32, 16), (6, 1)])
@pytest.mark.parametrize("strength", [RWKV7_DECAY, 4.0])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_recurrent_values_and_gradients_float64(T, chunk, strength, with_state,
                                                                assert_same_gradients):
    *inputs, s0 = _inputs(T=T, strength=strength)
    leaves = [t.requires_grad_() for t in (*inputs, s0)]
    s0 = s0 if with_state else None
    reference = rwkv7_recurrent(*inputs, s0)
    chunked = rwkv7_chunked(*inputs, s0, chunk_size=chunk)
    for fast, ref in zip(chunked, reference, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    assert_same_gradients(chunked, reference, leaves, rtol=1e-9, atol=1e-9)


def test_gradcheck_chunked():
    *inputs, s0 = _inputs(B=1, T=5, H=2, dk=3, dv=2)
    args = [t.requires_grad_() for t in (*inputs, s0)]

    def f(*xs):
        return rwkv7_chunked(*xs, chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strong_decay_stays_finite_and_exact(dtype):
    # up to 8 nats per token (decays down to e^-8) over chunks of 8: factors up to e^64, and
    # pairs of positions whose joint decay underflows float32
    *inputs, s0 = _inputs(T=70, strength=8.0, dtype=dtype)
    y_ref, s_ref = rwkv7_recurrent(*inputs, s0)
    y, s = rwkv7_chunked(*inputs, s0, chunk_size=8)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s, s_ref, rtol=tol, atol=tol)


def test_rwkv7_strongest_decay_over_a_long_sequence():
    # every token at the model's bound: the chunk size used in training (32) in float32
    *inputs, s0 = _inputs(T=300, dtype=torch.float32)
    inputs[1] = torch.full_like(inputs[1], -RWKV7_DECAY)
    y_ref, s_ref = rwkv7_recurrent(*inputs, s0)
    y, s = rwkv7_chunked(*inputs, s0, chunk_size=32)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_decay_beyond_the_dtype_range_raises_instead_of_overflowing():
    *inputs, s0 = _inputs(T=32, strength=30.0, dtype=torch.float32)
    inputs[1] = torch.full_like(inputs[1], -30.0)  # chunks of 16: e^480
    with pytest.raises(ValueError, match="use a smaller chunk_size"):
        rwkv7_chunked(*inputs, s0, chunk_size=16)
    y, _ = rwkv7_chunked(*inputs, s0, chunk_size=2)  # e^60: fine
    y_ref, _ = rwkv7_recurrent(*inputs, s0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_step_loop_equals_recurrent():
    *inputs, s0 = _inputs(T=13)
    y_ref, s_ref = rwkv7_recurrent(*inputs, s0)
    state, outs = s0, []
    for t in range(13):
        y_t, state = rwkv7_step(*(x[:, t] for x in inputs), state)
        outs.append(y_t)
    torch.testing.assert_close(torch.stack(outs, 1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s_ref, rtol=1e-12, atol=1e-12)


def test_chunks_compose_through_the_state():
    *inputs, _ = _inputs(T=30)
    y_full, s_full = rwkv7_chunked(*inputs, chunk_size=8)
    y1, s1 = rwkv7_chunked(*(x[:, :11] for x in inputs), chunk_size=8)
    y2, s2 = rwkv7_chunked(*(x[:, 11:] for x in inputs), s1, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(s2, s_full)


def test_transition_convention():
    # one token from S_0, no decay (log w = 0): S_1 = S_0 (I - kk (kk a)^T) + v k^T, y = S_1 r,
    # with S (d_v, d_k): written out with plain matrices
    *inputs, s0 = _inputs(B=1, T=1, H=1)
    r, w, k, v, kk, a = (x[0, 0, 0] for x in inputs)
    inputs[1] = torch.zeros_like(inputs[1])
    y, s = rwkv7_recurrent(*inputs, s0)
    S0 = s0[0, 0]
    expected = S0 @ (torch.eye(len(kk), dtype=S0.dtype) - torch.outer(kk, kk * a)) \
        + torch.outer(v, k)
    torch.testing.assert_close(s[0, 0], expected)
    torch.testing.assert_close(y[0, 0, 0], expected @ r)


def test_full_rate_removes_the_value_under_the_removal_key():
    # a = 1 and k = 0: the write is empty and S kk goes to zero (the delta rule's replacement)
    *inputs, s0 = _inputs(B=1, T=1, H=1)
    r, w, k, v, kk, a = inputs
    _, s = rwkv7_recurrent(r, torch.zeros_like(w), torch.zeros_like(k), v, kk,
                           torch.ones_like(a), s0)
    torch.testing.assert_close(s[0, 0] @ kk[0, 0, 0], torch.zeros(v.shape[-1],
                                                                  dtype=v.dtype))


def test_bf16_autocast_close_to_float32():
    *inputs, s0 = _inputs(B=2, T=70, H=2, dk=16, dv=16, dtype=torch.float32)
    y_ref, s_ref = rwkv7_chunked(*inputs, s0, chunk_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = rwkv7_chunked(*(t.bfloat16() for t in inputs), s0, chunk_size=32)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert (y.float() - y_ref).abs().max() / y_ref.abs().max() < 0.05
    assert (s - s_ref).abs().max() / s_ref.abs().max() < 0.05


def test_bad_chunk_size_raises():
    *inputs, _ = _inputs(T=4)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        rwkv7_chunked(*inputs, chunk_size=0)
