"""The gated delta rule: chunked (training path) and one-token step against the recurrence."""

import pytest
import torch
import torch.nn.functional as F

from gam.models.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step

# tiny tensors: one thread (the shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(B=2, T=37, H=3, dk=8, dv=5, decay=True, dtype=torch.float64, seed=0,
            strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    scale = 30.0 if strong_decay else 1.0
    log_decay = -scale * torch.rand(B, T, H, generator=g, dtype=dtype) if decay else None
    state = torch.randn(B, H, dk, dv, generator=g, dtype=dtype)
    return q, k, v, beta, log_decay, state


CASES = {  # (T, chunk): not a multiple of the chunk, shorter than it, several chunks, exact
    "ragged": (37, 8),
    "short": (5, 64),
    "exact": (32, 16),
    "chunk1": (6, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_matches_recurrent_values_and_gradients_float64(case, decay, with_state):
    T, chunk = CASES[case]
    q, k, v, beta, g, s0 = _inputs(T=T, decay=decay)
    leaves = [t.requires_grad_() for t in (q, k, v, beta, s0)] + ([g.requires_grad_()]
                                                                  if decay else [])
    s0 = s0 if with_state else None
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, g, s0)
    o, s = delta_rule_chunked(q, k, v, beta, g, s0, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    go, gs = torch.randn_like(o), torch.randn_like(s)
    grads_ref = torch.autograd.grad((o_ref * go).sum() + (s_ref * gs).sum(), leaves,
                                    allow_unused=True)
    grads = torch.autograd.grad((o * go).sum() + (s * gs).sum(), leaves, allow_unused=True)
    for a, b in zip(grads, grads_ref, strict=True):
        if b is None:  # the initial state when it was not passed
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_strong_decay_does_not_overflow():
    # up to 30 nats of decay per token: e^(gamma_i - gamma_j) for j > i would overflow
    q, k, v, beta, g, s0 = _inputs(T=50, strong_decay=True, dtype=torch.float32)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, g, s0)
    o, s = delta_rule_chunked(q, k, v, beta, g, s0, chunk_size=16)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay", [True, False])
def test_gradcheck_chunked(decay):
    q, k, v, beta, g, s0 = _inputs(B=1, T=5, H=2, dk=3, dv=2, decay=decay)
    args = [t.requires_grad_() for t in (q, k, v, beta)]
    g = g.requires_grad_() if decay else None
    s0.requires_grad_()

    def f(q, k, v, beta, g, s0):
        return delta_rule_chunked(q, k, v, beta, g, s0, chunk_size=2)

    assert torch.autograd.gradcheck(f, (*args, g, s0))


@pytest.mark.parametrize("decay", [True, False])
def test_step_loop_equals_recurrent(decay):
    q, k, v, beta, g, s0 = _inputs(T=13, decay=decay)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, g, s0)
    state, outs = s0, []
    for t in range(13):
        o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t],
                                     None if g is None else g[:, t], state)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s_ref, rtol=1e-12, atol=1e-12)


def test_chunks_compose_through_the_state():
    q, k, v, beta, g, _ = _inputs(T=30)
    o_full, s_full = delta_rule_chunked(q, k, v, beta, g, chunk_size=8)
    o1, s1 = delta_rule_chunked(q[:, :11], k[:, :11], v[:, :11], beta[:, :11], g[:, :11],
                                chunk_size=8)
    o2, s2 = delta_rule_chunked(q[:, 11:], k[:, 11:], v[:, 11:], beta[:, 11:], g[:, 11:], s1,
                                chunk_size=8)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full)
    torch.testing.assert_close(s2, s_full)


def test_delta_rule_replaces_the_value_stored_under_a_key():
    # beta = 1, no decay: writing (k, v1) then (k, v2) leaves S^T k = v2, not v1 + v2
    k = F.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1).expand(1, 2, 1, 4)
    v = torch.randn(1, 2, 1, 3, dtype=torch.float64)
    _, S = delta_rule_chunked(k, k, v, torch.ones(1, 2, 1, dtype=torch.float64))
    torch.testing.assert_close(S[0, 0].T @ k[0, 0, 0], v[0, 1, 0])


def test_bf16_autocast_close_to_float32():
    q, k, v, beta, g, s0 = _inputs(B=2, T=70, H=2, dk=16, dv=16, dtype=torch.float32)
    o_ref, s_ref = delta_rule_chunked(q, k, v, beta, g, s0, chunk_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = delta_rule_chunked(*(t.bfloat16() for t in (q, k, v, beta, g)), s0,
                                  chunk_size=32)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    err = (o.float() - o_ref).abs().max() / o_ref.abs().max()
    assert err < 0.03, err
    assert (s - s_ref).abs().max() / s_ref.abs().max() < 0.03


BF16_MATMUL_BOUND = 2e-2  # relative (Frobenius) error; measured 0.3-0.8% on these sizes


@pytest.mark.parametrize("dk, dv, chunk", [(16, 32, 32), (32, 32, 64)])
def test_bf16_matmuls_under_autocast_stay_close_to_float32_values_and_gradients(dk, dv, chunk):
    # float32 inputs: only the chunk's matmuls go to bf16 under autocast (the solve and the
    # carried state stay float32); the difference is not zero (the bf16 path is taken) and
    # within BF16_MATMUL_BOUND for the outputs, the final state and every gradient
    q, k, v, beta, g, s0 = _inputs(B=2, T=150, H=2, dk=dk, dv=dv, dtype=torch.float32)
    q = F.normalize(q, dim=-1)
    inputs = [t.requires_grad_() for t in (q, k, v, beta, 0.1 * g, s0)]
    gen = torch.Generator().manual_seed(1)
    results = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            o, s = delta_rule_chunked(*inputs, chunk_size=chunk)
        assert o.dtype == s.dtype == torch.float32
        if not results:
            w_o, w_s = torch.randn(o.shape, generator=gen), torch.randn(s.shape, generator=gen)
        results.append([o, s, *torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)])
    for fast, ref in zip(results[1], results[0], strict=True):
        err = ((fast - ref).norm() / ref.norm()).item()
        assert 0 < err < BF16_MATMUL_BOUND, err


def test_bad_chunk_size_raises():
    q, k, v, beta, g, _ = _inputs(T=4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        delta_rule_chunked(q, k, v, beta, g, chunk_size=0)
