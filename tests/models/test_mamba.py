"""Mamba: the scan three ways, parameter counts, cached decoding, causality, both stackings."""

import math

import pytest
import torch

from gam.models.mamba import MambaBlock, MambaConfig, MambaLM, MambaMixer
from gam.models.ops import _scan_cpp, kernels
from gam.models.ops import conv as conv_ops
from gam.models.ops import selective_scan as scan_ops
from gam.models.ops.conv import causal_depthwise_conv
from gam.models.ops.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)

HAS_KERNEL = _scan_cpp.load() is not None
BACKENDS = ["torch", pytest.param("kernel", marks=pytest.mark.skipif(
    not HAS_KERNEL, reason=f"scan kernel unavailable: {_scan_cpp.unavailable_reason()}"))]
TINY = dict(vocab_size=64, max_seq_len=64, d_model=32, n_layers=2, d_state=4, expand=2,
            dropout=0.0, chunk_size=16)


def _scan_inputs(Bsz, T, D, N, dtype, dt_max=2.0, seed=0, gate=False):
    """u, delta, A, B, C, D (and z): B and C are views into one (B, T, 3 + 2N) tensor and z
    into a (B, T, 2D) one, the layouts the mixer passes (x_proj split, in_proj chunk)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bsz, T, D, generator=g, dtype=dtype).requires_grad_()
    delta = (torch.rand(Bsz, T, D, generator=g, dtype=dtype) * dt_max).requires_grad_()
    A = (-torch.rand(D, N, generator=g, dtype=dtype) * 4 - 0.1).requires_grad_()
    BC = torch.randn(Bsz, T, 3 + 2 * N, generator=g, dtype=dtype).requires_grad_()
    D_ = torch.randn(D, generator=g, dtype=dtype).requires_grad_()
    inputs = [u, delta, A, BC[..., 3:3 + N], BC[..., 3 + N:], D_]
    if gate:
        inputs.append(torch.randn(Bsz, T, 2 * D, generator=g, dtype=dtype)
                      .requires_grad_()[..., D:])
    return inputs


def _values_and_grads(fn, inputs, seed=1):
    y, h = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    # drawn in float64 so that float32 and float64 runs see the same cotangents
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    dh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), inputs)
    return y, h, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, gate", [((2, 1, 8, 4), True), ((2, 16, 70, 3), False),
                                         ((1, 37, 64, 16), True), ((3, 50, 5, 2), False),
                                         ((2, 40, 130, 4), True)])
def test_fast_scan_matches_reference_values_and_gradients(backend, dtype, shape, gate):
    inputs = _scan_inputs(*shape, dtype, gate=gate)
    y_ref, h_ref, g_ref = _values_and_grads(selective_scan_reference, inputs)
    # chunk 16: one chunk, an exact multiple, and lengths that are not (37, 50)
    y, h, grads = _values_and_grads(
        lambda *a: selective_scan(*a, chunk_size=16, backend=backend), inputs)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.dtype == dtype and h.dtype == dtype
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(h, h_ref, **tol)
    for name, a, b in zip("u delta A B C D z".split(), grads, g_ref, strict=False):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_is_stable_for_large_decays_and_long_sequences(backend):
    # dt |A| up to ~40 per step: a cumulative-sum formulation would need exp(+10000)
    inputs = _scan_inputs(1, 300, 16, 4, torch.float32, dt_max=10.0)
    y, h, grads = _values_and_grads(
        lambda *a: selective_scan(*a, chunk_size=64, backend=backend), inputs)
    assert all(torch.isfinite(t).all() for t in (y, h, *grads))
    ref64 = [t.detach().double().requires_grad_() for t in inputs]
    y_ref, h_ref, g_ref = _values_and_grads(selective_scan_reference, ref64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not HAS_KERNEL, reason="scan kernel unavailable")
@pytest.mark.parametrize("T, K", [(1, 4), (2, 4), (37, 4), (9, 1)])
def test_conv_kernel_matches_conv1d_values_and_gradients(T, K):
    g = torch.Generator().manual_seed(T)
    xz = torch.randn(2, T, 2 * 70, generator=g, dtype=torch.float64, requires_grad=True)
    x = xz[..., :70]  # a row-strided view, as the in_proj chunk
    w = torch.randn(70, 1, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(70, generator=g, dtype=torch.float64, requires_grad=True)
    out = conv_ops.causal_conv_silu(x, w, b)
    ref = torch.nn.functional.silu(causal_depthwise_conv(x, w, b))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(out, [xz, w, b], dout),
                    torch.autograd.grad(ref, [xz, w, b], dout), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_step_by_step_matches_reference():
    u, delta, A, B, C, D = (t.detach() for t in _scan_inputs(2, 13, 12, 5, torch.float64))
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D)
    h = torch.zeros(2, 12, 5, dtype=torch.float64)
    for t in range(13):
        y_t, h = selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], D, h)
        torch.testing.assert_close(y_t, y_ref[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


def test_scan_runs_in_float32_under_bf16_autocast():
    u, delta, A, B, C, D = (t.detach() for t in _scan_inputs(2, 20, 16, 4, torch.float32))
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = selective_scan(u.bfloat16(), delta, A, B.bfloat16(), C, D)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=0.05, atol=0.05)  # only the inputs were rounded


def test_auto_backend_choice_and_fallback_without_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_modules", {name: None for name in kernels.FAST_KERNELS})
    assert scan_ops.pick_backend("cpu", torch.float32) == ("kernel" if HAS_KERNEL else "torch")
    assert scan_ops.pick_backend("cuda", torch.bfloat16) == "torch"
    monkeypatch.setattr(_scan_cpp, "load", lambda: None)  # e.g. no compiler
    assert scan_ops.pick_backend("cpu", torch.float32) == "torch"
    inputs = [t.detach() for t in _scan_inputs(1, 9, 8, 3, torch.float32)]
    torch.testing.assert_close(selective_scan(*inputs)[0], selective_scan_reference(*inputs)[0])
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        selective_scan(*inputs, backend="fast")


def test_mamba_ssm_dispatch_uses_its_layout(monkeypatch, fake_kernels):
    calls = []

    def fake_selective_scan_fn(u, delta, A, B, C, D, z=None, delta_bias=None,
                               delta_softplus=False, return_last_state=False):
        # mamba-ssm's contract: u, delta (B, D_in, T); B, C (B, N, T); no bias, no softplus here
        assert u.shape == delta.shape and u.shape[1] == A.shape[0] and B.shape[1] == A.shape[1]
        assert delta_bias is None and not delta_softplus and return_last_state
        assert A.dtype == D.dtype == torch.float32
        assert all(t.dtype == u.dtype for t in (delta, B, C, z))
        calls.append(u.shape)
        y, h = selective_scan_reference(*(t.float().transpose(1, 2) for t in (u, delta)), A,
                                        *(t.float().transpose(1, 2) for t in (B, C)), D,
                                        z.float().transpose(1, 2))
        return y.to(u.dtype).transpose(1, 2), h

    fake_kernels("mamba_ssm", selective_scan_fn=fake_selective_scan_fn)
    assert scan_ops.pick_backend("cuda", torch.bfloat16) == "mamba_ssm"
    inputs = [t.detach() for t in _scan_inputs(2, 7, 6, 3, torch.float32, gate=True)]
    y, h = selective_scan(*inputs, backend="mamba_ssm")
    y_ref, h_ref = selective_scan_reference(*inputs)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    # under bf16 autocast the mixer hands over bf16 u, z, B, C and a float32 delta
    u, delta, A, B, C, D, z = inputs
    y, h = selective_scan(u.bfloat16(), delta, A, B.bfloat16(), C.bfloat16(), D, z.bfloat16(),
                          backend="mamba_ssm")
    assert y.dtype == torch.bfloat16 and calls == [(2, 6, 7)] * 2
    monkeypatch.setitem(kernels._modules, "mamba_ssm", None)
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        selective_scan(*inputs, backend="mamba_ssm")


# ------------------------------------------------------------------------------ the model
def test_paper_size_parameter_counts():
    cfg = MambaConfig(stacking="paper", init="paper")  # vocab 10000, 256 positions, d 512
    assert (cfg.d_inner, cfg.dt_rank_value) == (1536, 32)
    mixer = MambaMixer(cfg)
    assert sum(p.numel() for p in mixer.parameters()) == 2_542_080
    shapes = {n: tuple(p.shape) for n, p in mixer.named_parameters()}
    assert shapes == {  # mamba-ssm's names and shapes
        "in_proj.weight": (3072, 512), "conv1d.weight": (1536, 1, 4), "conv1d.bias": (1536,),
        "x_proj.weight": (64, 1536), "dt_proj.weight": (1536, 32), "dt_proj.bias": (1536,),
        "A_log": (1536, 16), "D": (1536,), "out_proj.weight": (512, 1536)}
    paper = MambaLM(cfg)
    assert sum(p.numel() for p in paper.parameters()) == 20_504_576  # the paper's "20.5M"
    residual = MambaLM(MambaConfig(stacking="residual", init="paper"))
    assert sum(p.numel() for p in residual.parameters()) == 20_504_576 + 6 * 2 * 512


def test_mixer_init_follows_mamba_ssm():
    torch.manual_seed(0)
    mixer = MambaMixer(MambaConfig(d_model=64, d_state=8))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert mixer.dt_proj.weight.abs().max() <= 4 ** -0.5  # dt_rank = ceil(64 / 16) = 4
    torch.testing.assert_close(mixer.A_log.exp()[0], torch.arange(1.0, 9.0))
    assert torch.equal(mixer.D, torch.ones(192))


@pytest.mark.parametrize("kwargs, match", [
    (dict(stacking="post-norm"), "unknown stacking 'post-norm'"),
    (dict(d_state=0), "d_state must be an integer >= 1, got 0"),
    (dict(d_conv=-1), "d_conv"),
    (dict(expand=1.5), "expand"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(dt_rank=0), "dt_rank must be an integer >= 1 or None"),
    (dict(d_model=0), "d_model"),
])
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaConfig(**kwargs)


def _tiny_model(stacking, seed=0):
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(stacking=stacking, **TINY))
    with torch.no_grad():  # bigger conv/D/biases so every path shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("stacking", ["residual", "paper"])
@pytest.mark.parametrize("prompt_len", [1, 21, 63])
def test_cached_decoding_equals_full_forward(stacking, prompt_len):
    model = _tiny_model(stacking)
    idx = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full, _ = model(idx)  # (B, T, V)
    logits, cache = model.prefill(idx[:, :prompt_len])
    torch.testing.assert_close(logits, full[:, prompt_len - 1], atol=1e-4, rtol=0)
    conv, ssm = cache.layers[0]
    assert conv.shape == (2, 64, 3) and ssm.shape == (2, 64, 4) and ssm.dtype == torch.float32
    for t in range(prompt_len, 64):
        logits, cache = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=0)


def test_kernel_and_pure_pytorch_paths_agree_on_the_model(monkeypatch):
    # the fused kernels (conv + silu, scan + D + gate) against conv1d and the torch scan
    model = _tiny_model("residual").double()
    idx = torch.randint(0, 64, (2, 40))
    logits, loss = model(idx, idx)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    monkeypatch.setattr(_scan_cpp, "load", lambda: None)
    logits_t, loss_t = model(idx, idx)
    grads_t = torch.autograd.grad(loss_t, list(model.parameters()))
    torch.testing.assert_close(logits, logits_t, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_prefill_conv_state_is_last_pre_conv_inputs():
    block = MambaBlock(MambaConfig(stacking="paper", **TINY)).eval()
    x = torch.randn(1, 5, 32)
    _, state = block.prefill(x)
    xi = block.mixer.in_proj(x)[..., :64]  # (1, 5, E): the conv's inputs
    torch.testing.assert_close(state.conv, xi[0, -3:].T[None])
    _, state = block.prefill(x[:, :2])  # shorter than d_conv - 1: zeros in front
    torch.testing.assert_close(state.conv[..., 0], torch.zeros(1, 64))
    torch.testing.assert_close(state.conv[..., 1:], xi[0, :2].T[None])


@pytest.mark.parametrize("stacking", ["residual", "paper"])
def test_causal_future_embeddings_get_exactly_zero_gradient(stacking, monkeypatch):
    model = _tiny_model(stacking)
    embedded = []
    embed = model.embed

    def keep_embedding(*args, **kwargs):
        x = embed(*args, **kwargs)
        x.retain_grad()
        embedded.append(x)
        return x

    monkeypatch.setattr(model, "embed", keep_embedding)
    idx = torch.randint(0, 64, (2, 40))
    logits, _ = model(idx)
    t = 17
    logits[:, t].square().sum().backward()
    grad = embedded[0].grad  # (B, T, C)
    assert grad[:, t + 1:].abs().max() == 0
    assert grad[:, : t + 1].abs().sum(-1).min() > 0  # every past token matters (no window)


def test_generate_and_bf16_autocast_training_step():
    model = _tiny_model("residual")
    out = model.generate(torch.randint(0, 64, (2, 5)), 8, temperature=0.8, top_k=10, seed=0)
    assert out.shape == (2, 13)
    model.train()
    idx = torch.randint(0, 64, (2, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.bfloat16().eval()  # a pure bf16 model: the scan still runs in float32 inside
    logits, _ = model(idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert model.generate(idx[:, :4], 3, temperature=0).shape == (2, 7)


def test_paper_stacking_collapses_activations_residual_does_not():
    # paper width (d 512, expand 3, 6 layers); batch 1 and 16 tokens keep it cheap
    stds = {}
    for stacking in ("paper", "residual"):
        torch.manual_seed(0)
        model = MambaLM(MambaConfig(stacking=stacking, dropout=0.0)).eval()
        x = torch.randn(1, 16, 512)  # unit-std input to the first block
        with torch.no_grad():
            for block in model.blocks:
                x = block(x)
        stds[stacking] = x.std().item()
    assert stds["residual"] > 0.5
    assert stds["paper"] < 1e-6 * stds["residual"]
    assert math.isfinite(stds["paper"])


def test_decoding_with_kernel_size_one_has_an_empty_conv_state():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(stacking="residual", **{**TINY, "d_conv": 1})).eval()
    idx = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        full, _ = model(idx)
    logits, cache = model.prefill(idx[:, :5])
    assert cache.layers[0].conv.shape == (1, 64, 0)
    for t in range(5, 12):
        logits, cache = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=0)
