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


@pytest.fixture
def fake_kernels(monkeypatch):
    """``install(name, **functions)``: a fake fast kernel (``gam.models.ops.kernels``), used
    for CPU tensors too, so that the dispatch code runs here. No real fast kernel is seen."""
    from types import SimpleNamespace

    from gam.models.ops import kernels

    monkeypatch.setattr(kernels, "FAST_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(kernels, "_modules", {name: None for name in kernels.FAST_KERNELS})
    monkeypatch.setattr(kernels, "_failed", {})

    def install(name, **functions):
        kernels._modules[name] = SimpleNamespace(**functions)

    return install
