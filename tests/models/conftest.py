"""Helpers shared by the model tests."""

import pytest
import torch


def _logit_gradients(model, T):
    """(T, T) matrix: entry [t, s] is the size of the gradient of position t's logits with
    respect to token s's embedding."""
    model.eval()
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    emb = model.token_embedding(idx).detach().requires_grad_()
    handle = model.token_embedding.register_forward_hook(lambda m, a, out: emb)
    logits, _ = model(idx)
    handle.remove()
    grads = torch.zeros(T, T)
    for t in range(T):
        (g,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
        grads[t] = g[0].abs().sum(-1)
    return grads


def _logit_dependence(model, T):
    """Boolean (T, T) matrix: entry [t, s] says whether the logits at t depend on input s
    (through the gradient of position t's logits with respect to token s's embedding)."""
    return _logit_gradients(model, T) > 0


@pytest.fixture
def logit_gradients():
    """``logit_gradients(model, T)``: how strongly each position's logits depend on each
    input token."""
    return _logit_gradients


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


def _check_fast_path_matches_reference(block, x):
    """float64: ``block(x)`` and its gradients (input and every parameter) against
    ``block.forward_reference(x)``."""
    y = block(x)
    g_out = torch.randn_like(y)
    params = [x, *block.parameters()]
    grads = torch.autograd.grad(y, params, g_out, allow_unused=True)
    y_ref = block.forward_reference(x)
    grads_ref = torch.autograd.grad(y_ref, params, g_out, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _check_cached_decoding(model, prompt_len, tol):
    """prefill(prompt) then step() token by token give the parallel forward's logits."""
    T = model.config.max_seq_len
    idx = torch.randint(0, model.config.vocab_size, (2, T))
    full, _ = model(idx)  # (B, T, V)
    logits, cache = model.prefill(idx[:, :prompt_len])
    torch.testing.assert_close(logits, full[:, prompt_len - 1], **tol)
    for t in range(prompt_len, T):
        logits, cache = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], **tol)
    assert cache.seq_len == T


def _check_future_token_leaves_past_unchanged(model):
    idx = torch.randint(0, model.config.vocab_size, (2, 40))
    other = idx.clone()
    other[:, 25] = (other[:, 25] + 1) % model.config.vocab_size
    a, b = model(idx)[0], model(other)[0]
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=0)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


@pytest.fixture
def check_fast_path_matches_reference():
    return _check_fast_path_matches_reference


@pytest.fixture
def check_cached_decoding():
    return _check_cached_decoding


@pytest.fixture
def check_future_token_leaves_past_unchanged():
    return _check_future_token_leaves_past_unchanged


def _perturb(module):
    """Every parameter plus 0.05 N(0, 1) (biases and norms start at 0 and 1: make each one
    matter), in place; returns the module."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


@pytest.fixture
def perturb():
    return _perturb


def _check_bf16_cached_decoding(model):
    """Under bf16 autocast, prefill + steps keep the delta-rule state (``memory``) and the conv
    window (``qkv``) in float32 and stay within 0.1 of the parallel forward's last logits."""
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(idx)
        logits, cache = model.prefill(idx[:, :7])
        for t in range(7, 12):
            logits, cache = model.step(idx[:, t], cache)
    assert all(s.memory.dtype == torch.float32 and s.qkv.dtype == torch.float32
               for s in cache.layers)
    assert torch.isfinite(logits).all()
    assert (logits.float() - full[:, -1].float()).abs().max() < 0.1


@pytest.fixture
def check_bf16_cached_decoding():
    return _check_bf16_cached_decoding


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
