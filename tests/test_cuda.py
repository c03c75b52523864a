"""Tests for a CUDA machine (``pytest -m cuda``; skipped without a GPU, not yet run on one):
every installed fast kernel against our PyTorch path, forward and backward, at the tolerances
of the kernels' own test suites; whole-model fp32 logits on the CPU and on CUDA for every
registered family; no host syncs in a training step. ``.ci/gpu`` runs them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gam.models.ops import conv as conv_ops
from gam.models.ops import delta_rule as delta_ops
from gam.models.ops import kernels
from gam.models.ops import selective_scan as scan_ops
from gam.models.registry import MODELS, build_model

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
# (rtol, atol) of mamba-ssm's tests/ops/test_selective_scan.py and causal-conv1d's
# tests/test_causal_conv1d.py; fla's tests compare error ratios (below)
SCAN_TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}
CONV_TOL = {torch.float32: (3e-4, 1e-3), torch.bfloat16: (1e-2, 5e-2)}
FLA_RATIO = {"o": 0.005, "state": 0.005, "dq": 0.008, "dk": 0.008, "dv": 0.008,
             "dbeta": 0.02, "dg": 0.02}


@pytest.fixture(autouse=True)
def full_float32():
    """The comparisons are of float32 paths: TF32 matmuls would round inputs to 10 bits."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def need(name):
    if kernels.fast_kernel(name) is None:
        pytest.skip(f"{kernels.FAST_KERNELS[name][0]} is not installed (the [cuda] extra)")


def error_ratio(ref, out):
    """fla's measure: RMS of the difference over RMS of the reference."""
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(fn, inputs, seed=1):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device=outs[0].device).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device=o.device)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
    return [o.detach() for o in outs], list(grads)


def _torch_only(monkeypatch):
    monkeypatch.setattr(kernels, "FAST_DEVICE_TYPES", set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_scan_matches_the_torch_scan(dtype, monkeypatch):
    need("mamba_ssm")
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=CUDA)
    Bsz, T, Din, N = 2, 300, 64, 16
    u, z = r(Bsz, T, Din).to(dtype), r(Bsz, T, Din).to(dtype)
    delta = F.softplus(r(Bsz, T, Din) - 2)
    A = -torch.rand(Din, N, generator=g, device=CUDA) - 0.1
    B, C, D = r(Bsz, T, N).to(dtype), r(Bsz, T, N).to(dtype), r(Din)
    inputs = _leaves(u, delta, A, B, C, D, z)
    fast = _grads(lambda *a: scan_ops.selective_scan(*a, backend="mamba_ssm"), inputs)
    ref = _grads(lambda *a: scan_ops.selective_scan(*a, backend="torch"), _leaves(*inputs))
    rtol, atol = SCAN_TOL[dtype]
    for a, b in zip(fast[0] + fast[1], ref[0] + ref[1], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def test_mamba_ssm_step_matches_the_torch_step(monkeypatch):
    need("mamba_ssm_step")
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=CUDA)
    u, delta, A = r(3, 64), F.softplus(r(3, 64)), -torch.rand(64, 16, device=CUDA)
    B, C, D, h = r(3, 16), r(3, 16), r(64), r(3, 64, 16)
    fast = scan_ops.selective_scan_step(u, delta, A, B, C, D, h)
    _torch_only(monkeypatch)
    ref = scan_ops.selective_scan_step(u, delta, A, B, C, D, h)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [64, 36])  # channel-last view / channels-first copy
@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d_matches_conv1d(dtype, channels, silu, monkeypatch):
    need("causal_conv1d")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 200, channels, generator=g, device=CUDA).to(dtype)
    w = torch.randn(channels, 1, 4, generator=g, device=CUDA)
    b = torch.randn(channels, generator=g, device=CUDA)
    op = conv_ops.causal_conv_silu if silu else conv_ops.causal_depthwise_conv
    run = lambda *a: op(*a)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fast = _grads(run, _leaves(x.float(), w, b))
        _torch_only(monkeypatch)
        ref = _grads(run, _leaves(x.float(), w, b))
    rtol, atol = CONV_TOL[dtype]
    for a, r_ in zip(fast[0] + fast[1], ref[0] + ref[1], strict=True):
        torch.testing.assert_close(a.float(), r_.float(), rtol=rtol, atol=atol * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_update_matches_the_torch_step(dtype, monkeypatch):
    need("causal_conv1d_update")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 64, generator=g, device=CUDA).to(dtype)
    window = torch.randn(3, 64, 3, generator=g, device=CUDA).to(dtype)
    w = torch.randn(64, 1, 4, generator=g, device=CUDA).to(dtype)
    b = torch.randn(64, generator=g, device=CUDA).to(dtype)
    fast = conv_ops.causal_conv_step(x, window, w, b, silu=True)
    _torch_only(monkeypatch)
    ref = conv_ops.causal_conv_step(x, window, w, b, silu=True)
    rtol, atol = CONV_TOL[dtype]
    for a, r_ in zip(fast, ref, strict=True):
        torch.testing.assert_close(a.float(), r_.float(), rtol=rtol, atol=atol * 4)


@pytest.mark.parametrize("decay", [True, False])
def test_fla_delta_rule_matches_the_chunked_path(decay, monkeypatch):
    need("fla")
    g = torch.Generator(device="cuda").manual_seed(0)
    Bsz, T, H, dk, dv = 2, 300, 4, 64, 64
    q = F.normalize(torch.randn(Bsz, T, H, dk, generator=g, device=CUDA), dim=-1)
    k = F.normalize(torch.randn(Bsz, T, H, dk, generator=g, device=CUDA), dim=-1)
    v = torch.randn(Bsz, T, H, dv, generator=g, device=CUDA)
    beta = torch.rand(Bsz, T, H, generator=g, device=CUDA)
    log_decay = F.logsigmoid(torch.randn(Bsz, T, H, generator=g, device=CUDA)) if decay \
        else None
    S0 = torch.randn(Bsz, H, dk, dv, generator=g, device=CUDA)
    # the same bf16-rounded inputs for both: the comparison is of the kernels, not the rounding
    q, k, v = (t.bfloat16().float() for t in (q, k, v))
    leaves = [q, k, v, beta] + ([log_decay] if decay else [])

    def run(*a):
        q_, k_, v_, b_ = a[:4]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return delta_ops.delta_rule_chunked(q_, k_, v_, b_, a[4] if decay else None, S0)

    fast = _grads(run, _leaves(*leaves))
    _torch_only(monkeypatch)
    ref = _grads(run, _leaves(*leaves))
    names = ["o", "state", "dq", "dk", "dv", "dbeta"] + (["dg"] if decay else [])
    for name, a, b in zip(names, fast[0] + fast[1], ref[0] + ref[1], strict=True):
        assert error_ratio(b, a) <= FLA_RATIO[name], name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_logits_match_on_cpu_and_cuda(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny").eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        cpu, _ = model(idx)
        gpu, _ = model.to(CUDA)(idx.to(CUDA))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gam", "gam-delta", "mamba", "transformer"])
def test_a_training_step_does_not_sync(name):
    from gam.training.config import TrainConfig
    from gam.training.optim import build_optimizer
    from gam.training.step import train_step

    torch.manual_seed(0)
    model = build_model(name, "tiny").to(CUDA)
    opt = build_optimizer(model, TrainConfig())
    idx = torch.randint(0, model.config.vocab_size, (2, 32), device=CUDA)
    train_step(model, opt, idx, idx, dtype="bf16", grad_clip=1.0)  # warm-up (lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets=idx, return_logits=False)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
