"""Fused element-wise ops against their plain references."""

import math

import pytest
import torch
import torch.nn.functional as F

from gam import build_model
from gam.models.ops.fused import (
    Dropout,
    dropout_add,
    dropout_add_reference,
    dropout_mask,
    gated_residual,
    gated_residual_reference,
)


@pytest.mark.parametrize("n_paths", [1, 2])
@pytest.mark.parametrize("shape", [(3, 5, 8), (4, 8), (1, 1, 2)])
def test_gated_residual_matches_reference_values_and_gradients(n_paths, shape):
    torch.manual_seed(0)
    C = shape[-1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], n_paths * C, dtype=torch.float64, requires_grad=True)
    paths = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(n_paths)]
    out = gated_residual(x, g, paths)
    ref = gated_residual_reference(x, g, paths)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    inputs = [x, g, *paths]
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: gated_residual(t[0], t[1], list(t[2:])),
                                    tuple(inputs))


def test_gated_residual_mixed_precision_like_autocast():
    """fp32 residual, bf16 gates and paths (what autocast hands the block)."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, requires_grad=True)
    g = torch.randn(2, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    paths = [torch.randn(2, 7, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    out, ref = gated_residual(x, g, paths), gated_residual_reference(x, g, paths)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, g, *paths], grad),
                    torch.autograd.grad(ref, [x, g, *paths], grad), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_gated_residual_rejects_wrong_gate_width():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="2 x 4 features"):
        gated_residual(x, torch.randn(2, 4), [x, x])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_rate_and_scale(p, dtype):
    torch.manual_seed(0)
    n = 400_000
    mask = dropout_mask((n // 400, 400), p, dtype)
    assert mask.shape == (n // 400, 400) and mask.dtype == dtype
    values = set(mask.float().unique().tolist())
    assert values <= {0.0, float(torch.tensor(1 / (1 - p), dtype=dtype))}
    dropped = (mask == 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma, (dropped, p)


def test_dropout_mask_is_independent_across_positions():
    """Neighbouring elements (the two 32-bit halves of one 64-bit draw) are uncorrelated."""
    torch.manual_seed(1)
    m = (dropout_mask((200_000, 2), 0.5, torch.float32) == 0).float()
    both = (m[:, 0] * m[:, 1]).mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 200_000)
    row = (dropout_mask((1, 100_001), 0.5, torch.float32) == 0).float()[0]
    assert abs((row[:-1] * row[1:]).mean().item() - 0.25) < 0.01


def test_dropout_is_reproducible_under_manual_seed_and_rejects_bad_p():
    torch.manual_seed(3)
    a = dropout_mask((7, 9), 0.3, torch.float32)
    torch.manual_seed(3)
    b = dropout_mask((7, 9), 0.3, torch.float32)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1.0"):
        dropout_mask((2,), 1.0, torch.float32)


@pytest.mark.parametrize("with_residual", [False, True])
def test_dropout_add_equals_reference_with_its_own_mask(with_residual):
    """Same mask -> same values and gradients as residual + F.dropout; eval mode is identity."""
    torch.manual_seed(0)
    y = torch.randn(4, 6, 32, requires_grad=True)
    r = torch.randn(4, 6, 32, requires_grad=True) if with_residual else None
    torch.manual_seed(5)
    out = dropout_add(y, 0.25, True, r)
    torch.manual_seed(5)
    mask = dropout_mask(y.shape, 0.25, y.dtype)
    want = y * mask + (r if with_residual else 0)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(y.grad, grad * mask)
    if with_residual:
        torch.testing.assert_close(r.grad, grad)
    for training, p in ((False, 0.25), (True, 0.0)):
        torch.testing.assert_close(dropout_add(y, p, training, r),
                                   dropout_add_reference(y, p, training, r))


def test_dropout_add_statistics_match_f_dropout():
    """Both keep E[out] = y and drop the same fraction (the reference draws its own mask)."""
    torch.manual_seed(0)
    y = torch.ones(1000, 512)
    fast = dropout_add(y, 0.1, True)
    ref = F.dropout(y, 0.1, True)
    for out in (fast, ref):
        assert abs(out.mean().item() - 1.0) < 0.01
        assert abs((out == 0).float().mean().item() - 0.1) < 0.005


def test_dropout_module_is_nn_dropout_compatible():
    d = Dropout(0.2)
    assert isinstance(d, torch.nn.Dropout) and d.state_dict() == {}
    x = torch.randn(3, 4)
    d.eval()
    assert torch.equal(d(x), x) and torch.equal(d(x, x), 2 * x)


@pytest.mark.parametrize("name", ["gam", "transformer"])
def test_training_step_with_dropout_is_reproducible_and_finite(name):
    """The fused dropout inside whole models: same seed -> same loss and gradients."""
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(name, "tiny", dropout=0.1).train()
        idx = torch.randint(0, model.config.vocab_size, (2, 16))
        _, loss = model(idx, idx, return_logits=False)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    assert torch.isfinite(l1) and torch.equal(l1, l2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
