"""The dispatch to the field's CUDA kernels (``gam.models.ops.kernels``), exercised on the CPU with
fake kernel modules: layouts, dtype casts, fallbacks; and the PyTorch paths a CUDA run takes
when the fast kernels are absent, forced here (``_scan_cpp.load`` patched to None is
``GAM_SCAN_KERNEL=0``)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gam.models.ops import _scan_cpp, kernels
from gam.models.ops import conv as conv_ops
from gam.models.ops import delta_rule as delta_ops
from gam.models.ops import selective_scan as scan_ops
from gam.models.ops.selective_scan import selective_scan, selective_scan_reference


def _scan_inputs(b=2, t=9, d=6, n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return (r(b, t, d), F.softplus(r(b, t, d)), -torch.rand(d, n, generator=g, dtype=dtype),
            r(b, t, n), r(b, t, n), r(d), r(b, t, d))


def _conv_reference(x, w, b):
    """silu(causal conv) in float64: the exact answer to compare with."""
    return F.silu(conv_ops._conv1d(x.double(), w.double(), b.double()))


# ---------------------------------------------------------------- 1. the conv fallback's dtype
def test_conv_silu_fallback_computes_in_float32_under_bf16_autocast(monkeypatch):
    monkeypatch.setattr(_scan_cpp, "load", lambda: None)  # GAM_SCAN_KERNEL=0: the CUDA path
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 11, 24, generator=g), torch.randn(24, 1, 4, generator=g), \
        torch.randn(24, generator=g)
    assert kernels.choose("causal_conv_silu", "cpu", torch.float32, width=4) == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_ops.causal_conv_silu(x, w, b)
        out_bf16 = conv_ops.causal_conv_silu(x.bfloat16(), w, b)
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _conv_reference(x, w, b), rtol=1e-6, atol=1e-6)
    # a bf16 input is cast up, convolved in float32, and only the result is rounded
    ref = F.silu(conv_ops._conv1d(x.bfloat16().float(), w, b)).bfloat16()
    assert torch.equal(out_bf16, ref)


def test_gam_delta_keys_are_unit_norm_in_float32_without_the_cpu_kernel(monkeypatch):
    monkeypatch.setattr(_scan_cpp, "load", lambda: None)
    from gam.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("gam-delta", "tiny")
    mixer = next(m for m in model.modules() if hasattr(m, "qkv_conv"))
    h = torch.randn(2, 16, model.config.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, k, _ = mixer._heads(mixer._conv_silu(mixer.qkv_proj(h)))
    assert k.dtype == torch.float32
    assert (k.norm(dim=-1) - 1).abs().max() < 1e-5


# --------------------------------------------------------- 2. mamba_ssm failures and devices
def _failing(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


def test_mamba_ssm_failing_at_call_time_falls_back_with_one_warning(fake_kernels):
    fake_kernels("mamba_ssm", selective_scan_fn=_failing(
        RuntimeError("selective_scan_cuda is not available")))
    inputs = _scan_inputs()
    assert scan_ops.pick_backend("cpu", torch.float32) == "mamba_ssm"
    with pytest.warns(RuntimeWarning, match="mamba-ssm.*failed.*PyTorch path"):
        y, h = selective_scan(*inputs)
    y_ref, h_ref = selective_scan_reference(*inputs)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the kernel is now disabled
        selective_scan(*inputs)
    assert scan_ops.pick_backend("cpu", torch.float32) != "mamba_ssm"
    assert "selective_scan_cuda" in kernels.disabled_reasons()["mamba_ssm"]


def test_out_of_memory_in_a_fast_kernel_is_not_swallowed(fake_kernels):
    fake_kernels("mamba_ssm", selective_scan_fn=_failing(torch.OutOfMemoryError("CUDA OOM")))
    with pytest.raises(torch.OutOfMemoryError):
        selective_scan(*_scan_inputs())
    assert kernels.disabled_reasons() == {}


def test_float64_is_never_sent_to_mamba_ssm(fake_kernels):
    calls = []
    fake_kernels("mamba_ssm", selective_scan_fn=lambda *a, **k: calls.append(1))
    inputs = _scan_inputs(dtype=torch.float64)
    assert scan_ops.pick_backend("cuda", torch.float64) != "mamba_ssm"
    torch.testing.assert_close(selective_scan(*inputs)[0], selective_scan_reference(*inputs)[0])
    with pytest.raises(ValueError, match="float32, bf16 or fp16.*float64"):
        selective_scan(*inputs, backend="mamba_ssm")
    assert calls == []


def test_cpu_kernel_refuses_tensors_on_another_device():
    inputs = [t.to("meta") for t in _scan_inputs()]
    with pytest.raises(ValueError, match="compiled CPU kernel.*meta"):
        selective_scan(*inputs, backend="kernel")
    fake_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="cuda:0"):
        kernels.require_cpu("the scan kernel", torch.zeros(1), fake_gpu)
    kernels.require_cpu("the scan kernel", torch.zeros(1), None)  # CPU tensors pass


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown op 'attention'"):
        kernels.choose("attention", "cuda", torch.float32)


def test_without_packages_every_cuda_choice_is_torch(monkeypatch):
    monkeypatch.setattr(kernels, "_modules", {name: None for name in kernels.FAST_KERNELS})
    for op in kernels.OPS:
        assert kernels.choose(op, "cuda", torch.bfloat16, width=4, head_dim_k=64,
                              head_dim_v=64) == "torch"
    assert delta_ops is not None


# ------------------------------------------------------------- 7. the fast kernels' dispatch
def _fake_causal_conv1d_fn(calls):
    def causal_conv1d_fn(x, weight, bias=None, activation=None):
        # causal-conv1d's contract: x (B, C, T) channels first or channel-last, weight (C, K)
        # in x's dtype, activation None or "silu"
        assert x.dim() == 3 and weight.shape == (x.shape[1], weight.shape[1])
        assert weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
        assert x.stride(2) == 1 or x.stride(1) == 1
        calls.append((x.dtype, activation, x.stride(1) == 1))
        k = weight.shape[1]
        y = F.conv1d(F.pad(x.float(), (k - 1, 0)), weight.float()[:, None], bias.float()
                     if bias is not None else None, groups=x.shape[1])
        return (F.silu(y) if activation == "silu" else y).to(x.dtype)
    return causal_conv1d_fn


@pytest.mark.parametrize("channels", [24, 12])  # channel-last view / channels-first copy
def test_causal_conv1d_dispatch(fake_kernels, channels):
    calls = []
    fake_kernels("causal_conv1d", causal_conv1d_fn=_fake_causal_conv1d_fn(calls))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, channels, generator=g)
    w, b = torch.randn(channels, 1, 3, generator=g), torch.randn(channels, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_ops.causal_depthwise_conv(x, w, b)
        y_ref = conv_ops._conv1d(x, w, b)
        z = conv_ops.causal_conv_silu(x, w, b)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.02, atol=0.02)
    assert z.dtype == torch.float32  # the silu conv computes in float32 on every path
    torch.testing.assert_close(z.double(), _conv_reference(x, w, b), rtol=1e-6, atol=1e-6)
    channel_last = channels % 8 == 0
    assert calls == [(torch.bfloat16, None, channel_last), (torch.float32, "silu", channel_last)]
    # gradients flow through the kernel's output
    xg = x.clone().requires_grad_()
    conv_ops.causal_conv_silu(xg, w, b).sum().backward()
    assert xg.grad is not None
    # a kernel width the package does not take runs the PyTorch path
    calls.clear()
    conv_ops.causal_depthwise_conv(x, torch.randn(channels, 1, 5), b)
    assert calls == []


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_conv_step_is_the_parallel_conv_one_token_at_a_time(silu, with_bias):
    """float64: stepping through a sequence from a zero window gives causal_depthwise_conv's
    outputs (silu-ed when asked), and the window holds the last K-1 inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 1, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    full = conv_ops.causal_depthwise_conv(x, w, b)
    full = F.silu(full) if silu else full
    window = x.new_zeros(2, 5, 3)
    for t in range(x.shape[1]):
        y, window = conv_ops.causal_conv_step(x[:, t], window, w, b, silu=silu)
        torch.testing.assert_close(y, full[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(window, x[:, -3:].transpose(1, 2))


def test_causal_conv1d_update_dispatch_leaves_the_callers_window(fake_kernels):
    calls = []

    def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
        # causal-conv1d's contract: x (B, C), conv_state (B, C, state_len) updated in place,
        # weight (C, K) in x's dtype
        assert weight.dtype == x.dtype == conv_state.dtype and weight.dim() == 2
        calls.append(activation)
        full = torch.cat([conv_state, x[:, :, None]], dim=-1)
        conv_state.copy_(full[:, :, 1:])
        y = (full * weight).sum(-1) + (0 if bias is None else bias)
        return F.silu(y) if activation == "silu" else y

    fake_kernels("causal_conv1d_update", causal_conv1d_update=causal_conv1d_update)
    g = torch.Generator().manual_seed(1)
    x, window = torch.randn(2, 6, generator=g), torch.randn(2, 6, 2, generator=g)
    w, b = torch.randn(6, 1, 3, generator=g), torch.randn(6, generator=g)
    before = window.clone()
    y, new = conv_ops.causal_conv_step(x, window, w, b, silu=True)
    assert calls == ["silu"] and torch.equal(window, before)  # the caller's window unchanged
    kernels._modules["causal_conv1d_update"] = None  # the PyTorch path for the reference
    y_ref, new_ref = conv_ops.causal_conv_step(x, window, w, b, silu=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new, new_ref)


def test_selective_state_update_dispatch(fake_kernels):
    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False):
        # mamba-ssm's contract: state (B, D_in, N) float32, updated in place; returns y
        assert state.dtype == torch.float32 and state.shape == (*x.shape, A.shape[1])
        assert z is None and dt_bias is None and not dt_softplus
        new = torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B[:, None, :]
        state.copy_(new)
        return (torch.einsum("bdn,bn->bd", new, C) + x * D).to(x.dtype)

    u, delta, A, B, C, D, _ = _scan_inputs(b=2, t=1, d=6, n=3)
    h = torch.randn(2, 6, 3)
    h_before = h.clone()
    expected = scan_ops.selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, h)
    fake_kernels("mamba_ssm_step", selective_state_update=selective_state_update)
    assert kernels.choose("selective_scan_step", "cpu", torch.float32) == "mamba_ssm"
    y, h_new = scan_ops.selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, h)
    assert torch.equal(h, h_before)  # our step stays functional
    torch.testing.assert_close(y, expected[0])
    torch.testing.assert_close(h_new, expected[1])


def _delta_inputs(dk, dv=None, T=12, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = dv or dk
    q = F.normalize(torch.randn(2, T, H, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(2, T, H, dk, generator=g), dim=-1)
    v = torch.randn(2, T, H, dv, generator=g)
    beta = torch.rand(2, T, H, generator=g)
    log_decay = -torch.rand(2, T, H, generator=g)
    state = torch.randn(2, H, dk, dv, generator=g)
    return q, k, v, beta, log_decay, state


def test_fla_dispatch_layout_dtypes_and_limits(fake_kernels):
    calls = []

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                               output_final_state=False, use_qk_l2norm_in_kernel=False):
        # fla's contract: q, k (B, T, H, K), v (B, T, H, V) in one dtype, never float32; g the
        # log decay (B, T, H); beta (B, T, H); state (B, H, K, V)
        assert q.dtype == k.dtype == v.dtype and q.dtype != torch.float32
        assert g.shape == beta.shape == q.shape[:3] and g.dtype == torch.float32
        assert initial_state is None or initial_state.shape == (q.shape[0], q.shape[2],
                                                                q.shape[3], v.shape[3])
        assert output_final_state and not use_qk_l2norm_in_kernel
        calls.append(q.dtype)
        o, S = delta_ops.delta_rule_recurrent(q.float(), k.float(), v.float(), beta.float(), g,
                                              initial_state, scale)
        return o.to(q.dtype), S

    fake_kernels("fla", chunk_gated_delta_rule=chunk_gated_delta_rule)
    q, k, v, beta, g, S0 = _delta_inputs(16)
    o_ref, S_ref = delta_ops.delta_rule_recurrent(q, k, v, beta, g, S0)
    o, S = delta_ops.delta_rule_chunked(q, k, v, beta, g, S0)  # float32: our path
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, S = delta_ops.delta_rule_chunked(q, k, v, beta, g, S0)
        o_nodecay, _ = delta_ops.delta_rule_chunked(q, k, v, beta, None, None)
    assert calls == [torch.bfloat16] * 2
    assert o.dtype == torch.float32 and S.dtype == torch.float32  # v's dtype; float32 state
    torch.testing.assert_close(o, o_ref, rtol=0.05, atol=0.05)  # bf16 inputs
    torch.testing.assert_close(S, S_ref, rtol=0.05, atol=0.05)
    ref_nodecay = delta_ops.delta_rule_recurrent(q, k, v, beta, None, None)[0]
    torch.testing.assert_close(o_nodecay, ref_nodecay, rtol=0.05, atol=0.05)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # head dim 8: below fla's tiles
        delta_ops.delta_rule_chunked(*_delta_inputs(8)[:5])
    assert calls == []


# ------------------------------------------------------- 3. the PyTorch scan's chunk on a GPU
def test_torch_scan_takes_larger_chunks_on_an_accelerator():
    assert scan_ops.torch_scan_chunk("cpu", 8, 2048, 1536 * 16, 64) == 64
    assert scan_ops.torch_scan_chunk("cuda", 8, 256, 1536 * 16, 64) == 256  # paper size
    assert scan_ops.torch_scan_chunk("cuda", 8, 2048, 1536 * 16, 64) == 256  # memory-capped
    assert scan_ops.torch_scan_chunk("cuda", 1, 100, 64, 64) == 64  # never below chunk_size
    assert scan_ops.torch_scan_chunk("cuda", 64, 4096, 10**6, 64) == 64


def test_torch_scan_is_the_same_in_large_chunks_and_never_overflows(monkeypatch):
    u, delta, A, B, C, D, z = _scan_inputs(b=2, t=300, d=8, n=4, dtype=torch.float64)
    leaves = lambda: [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z)]

    def run(chunk, inputs):
        monkeypatch.setattr(scan_ops, "torch_scan_chunk", lambda *a: chunk)
        y, h = selective_scan(*inputs, backend="torch")
        grads = torch.autograd.grad((y.sum() + h.sum()), inputs)
        return [y, h, *grads]

    small, large = run(64, leaves()), run(256, leaves())
    for a, b in zip(small, large, strict=True):
        torch.testing.assert_close(a, b)
    # decays exp(dt A) underflow to 0 over a long chunk: products of factors <= 1 only
    strong = leaves()
    with torch.no_grad():
        strong[1].mul_(1e4)
    for t in run(256, strong):
        assert torch.isfinite(t).all()
