"""Helpers shared by the model tests."""

import pytest
import torch


def _logit_dependence(model, T):
    """Boolean (T, T) matrix: entry [t, s] says whether the logits at t depend on input s
    (through the gradient of position t's logits with respect to token s's embedding)."""
    model.eval()
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    emb = model.token_embedding(idx).detach().requires_grad_()
    handle = model.token_embedding.register_forward_hook(lambda m, a, out: emb)
    logits, _ = model(idx)
    handle.remove()
    dep = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        (g,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
        dep[t] = g[0].abs().sum(-1) > 0
    return dep


@pytest.fixture
def logit_dependence():
    """``logit_dependence(model, T)``: which input tokens each position's logits depend on."""
    return _logit_dependence


def _assert_same_gradients(outputs, references, leaves, rtol, atol):
    """The gradients of random projections of ``outputs`` and of ``references`` (tensors, the
    same shapes) with respect to ``leaves`` agree; a leaf neither depends on is None in both."""
    cotangents = [torch.randn_like(r) for r in references]
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outputs, cotangents,
                                                                   strict=True)),
                                leaves, allow_unused=True)
    grads_ref = torch.autograd.grad(sum((r * c).sum() for r, c in zip(references, cotangents,
                                                                       strict=True)),
                                    leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
        assert (a is None) == (b is None), f"leaf {i}"
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"leaf {i}")


@pytest.fixture
def assert_same_gradients():
    """``assert_same_gradients(outputs, references, leaves, rtol, atol)``: a fast path's
    gradients equal its reference's."""
    return _assert_same_gradients
