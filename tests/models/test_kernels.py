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
