"""Chunked linear cross-entropy against the plain head + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from gam import build_model
from gam.models.ops.losses import linear_cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [5, 1024])
def test_linear_cross_entropy_matches_reference_values_and_grads(reduction, chunk_rows):
    torch.manual_seed(0)
    x = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (23,))
    t[[0, 5, 6]] = -100
    loss = linear_cross_entropy(x, w, t, reduction=reduction, chunk_rows=chunk_rows)
    ref = F.cross_entropy(x @ w.T, t, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    ga = torch.autograd.grad(2.5 * loss, [x, w])
    gb = torch.autograd.grad(2.5 * ref, [x, w])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_without_grad_gives_the_same_loss():
    torch.manual_seed(0)
    x, w = torch.randn(10, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, chunk_rows=3)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.T, t))


def test_model_loss_without_logits_matches_and_trains_identically():
    torch.manual_seed(0)
    a = build_model("gam", "tiny")
    b = build_model("gam", "tiny")
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 256, (2, 24))
    tgt = torch.randint(0, 256, (2, 24))
    logits, la = a(idx, tgt)
    none, lb = b(idx, tgt, return_logits=False)
    assert none is None and logits.shape == (2, 24, 256)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_loss_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = (0.1 * torch.randn(100, 32)).requires_grad_()
    t = torch.randint(0, 100, (64,))
    ref = F.cross_entropy(x @ w.T, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02
    assert x.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    assert w.grad.dtype == torch.float32


@pytest.mark.parametrize("return_logits", [True, False])
def test_a_batch_whose_targets_are_all_ignored_has_loss_0_and_no_gradient(return_logits,
                                                                          one_torch_thread):
    torch.manual_seed(0)
    model = build_model("gam", "tiny")
    idx = torch.randint(0, 256, (2, 12))
    _, loss = model(idx, torch.full_like(idx, -100), return_logits=return_logits)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with torch.no_grad():
        assert float(linear_cross_entropy(torch.randn(4, 8), torch.randn(30, 8),
                                          torch.full((4,), -100))) == 0.0
