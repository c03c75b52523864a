"""Which implementation runs each shared op, for a device, dtype and shapes: one answer for the
dispatch code of the ops, ``gam env`` and every benchmark's ``results.json``.

The field's CUDA kernels are optional fast paths, used only when their package imports, the
tensors are on a CUDA device and the kernel supports the shapes and dtypes; everything else runs
our PyTorch path (or, on a CPU, the compiled kernel of ``_scan_cpp``). Install them with the
``[cuda]`` extra (they need a CUDA build of torch):

==================  =========================  =================================================
op                  fast kernel (package)      supported
==================  =========================  =================================================
causal_conv         ``causal_conv1d_fn``       width 2-4; float32 / bf16 / fp16
causal_conv_silu    ``causal_conv1d_fn``       (causal-conv1d), computed in float32 as on CPU
causal_conv_step    ``causal_conv1d_update``   (causal-conv1d), one decoding token, width 2-4
selective_scan      ``selective_scan_fn``      float32 / bf16 / fp16 (never float64)
selective_scan_step ``selective_state_update`` (mamba-ssm), float32 / bf16 / fp16
delta_rule          ``chunk_gated_delta_rule`` (flash-linear-attention), bf16 / fp16 (it
                                               refuses float32), head dims 16-256
==================  =========================  =================================================

Choices (``choose``): the fast kernel's name (``causal_conv1d``, ``mamba_ssm``, ``fla``),
``cpp`` (the compiled CPU kernel) or ``torch``. A fast kernel that imports but fails when called
(e.g. mamba-ssm's Python package without its CUDA build raises at call time) is disabled for
the rest of the process with a one-line warning, and the op falls back to PyTorch; an
out-of-memory error is raised as is (the fallback would need more memory, not less).

``recording()`` collects the (op, device type, dtype, shapes) every ``choose`` call saw: how
``gam.bench.kernel_report`` learns which ops each family uses.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gam.models.ops import _scan_cpp

OPS = ("causal_conv", "causal_conv_silu", "causal_conv_step", "selective_scan",
       "selective_scan_step", "delta_rule")
# fast kernel name -> (pip package, module, function names)
FAST_KERNELS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "causal_conv1d": ("causal-conv1d", "causal_conv1d", ("causal_conv1d_fn",)),
    "causal_conv1d_update": ("causal-conv1d", "causal_conv1d", ("causal_conv1d_update",)),
    "mamba_ssm": ("mamba-ssm", "mamba_ssm.ops.selective_scan_interface", ("selective_scan_fn",)),
    "mamba_ssm_step": ("mamba-ssm", "mamba_ssm.ops.triton.selective_state_update",
                       ("selective_state_update",)),
    "fla": ("flash-linear-attention", "fla.ops.gated_delta_rule", ("chunk_gated_delta_rule",)),
}
HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
CONV_WIDTHS = range(2, 5)  # causal_conv1d_fn's kernel sizes
FLA_HEAD_DIMS = range(16, 257)  # fla's triton tiles: at least 16 (tl.dot), at most 256
# device types the fast kernels run on; the CPU dispatch tests add "cpu" with fake kernels
FAST_DEVICE_TYPES = {"cuda"}

_modules: dict[str, Any] = {}  # name -> namespace of the kernel's functions, or None
_failed: dict[str, str] = {}  # name -> why it was disabled at call time
_recording: list[set[tuple[Any, ...]]] = []


def fast_kernel(name: str) -> Any:
    """A namespace holding the fast kernel's functions (``FAST_KERNELS``), None when its
    package is not installed (or was disabled after failing)."""
    if name in _failed:
        return None
    if name not in _modules:
        _, module, functions = FAST_KERNELS[name]
        try:
            mod = importlib.import_module(module)
            _modules[name] = type(name, (), {f: staticmethod(getattr(mod, f))
                                             for f in functions})
        except Exception:  # not installed, or a broken install missing its CUDA build
            _modules[name] = None
    return _modules[name]


def fail(name: str, exc: BaseException) -> bool:
    """Disable the fast kernel ``name`` after it raised ``exc`` at call time, warning once; True
    when the caller should fall back to PyTorch, False (re-raise) for out-of-memory errors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if name not in _failed:
        _failed[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        warnings.warn(f"{FAST_KERNELS[name][0]}'s {name} kernel failed ({_failed[name]}); "
                      f"using the PyTorch path for the rest of this process",
                      RuntimeWarning, stacklevel=4)
    return True


def attempt(name: str, call: Callable[[], Any]) -> Any:
    """``call()``, the fast kernel ``name``'s path; None when it failed and was disabled (the
    caller then runs its PyTorch path); an out-of-memory error propagates."""
    try:
        return call()
    except Exception as exc:
        if not fail(name, exc):
            raise
        return None


def disabled_reasons() -> dict[str, str]:
    """Fast kernels disabled after failing, with why."""
    return dict(_failed)


@contextlib.contextmanager
def recording() -> Iterator[set[tuple[Any, ...]]]:
    """Collect ``(op, device_type, dtype, shapes)`` of every ``choose`` call in the block."""
    seen: set[tuple[Any, ...]] = set()
    _recording.append(seen)
    try:
        yield seen
    finally:
        _recording.remove(seen)


def _fast(name: str, device_type: str) -> bool:
    return device_type in FAST_DEVICE_TYPES and fast_kernel(name) is not None


def _cpu_kernel() -> bool:
    return _scan_cpp.load() is not None


def choose(op: str, device_type: str, dtype: torch.dtype, **shapes: int) -> str:
    """The implementation ``op`` runs for tensors of ``device_type`` and (compute) ``dtype``:
    a fast kernel's name, ``cpp`` or ``torch``. ``shapes``: ``width`` (convs), ``head_dim_k``
    and ``head_dim_v`` (delta rule)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    for seen in _recording:
        seen.add((op, device_type, dtype, tuple(sorted(shapes.items()))))
    if op in ("causal_conv", "causal_conv_silu"):
        if dtype in HALF_OR_FLOAT and shapes.get("width") in CONV_WIDTHS \
                and _fast("causal_conv1d", device_type):
            return "causal_conv1d"
        if op == "causal_conv_silu" and device_type == "cpu" and _cpu_kernel():
            return "cpp"
        return "torch"
    if op == "causal_conv_step":
        if dtype in HALF_OR_FLOAT and shapes.get("width") in CONV_WIDTHS \
                and _fast("causal_conv1d_update", device_type):
            return "causal_conv1d"
        return "torch"
    if op == "selective_scan":
        if dtype in HALF_OR_FLOAT and _fast("mamba_ssm", device_type):
            return "mamba_ssm"
        if device_type == "cpu" and torch.promote_types(dtype, torch.float32) in (
                torch.float32, torch.float64) and _cpu_kernel():
            return "cpp"
        return "torch"
    if op == "selective_scan_step":
        if dtype in HALF_OR_FLOAT and _fast("mamba_ssm_step", device_type):
            return "mamba_ssm"
        return "torch"
    # delta_rule
    if dtype in (torch.bfloat16, torch.float16) and _fast("fla", device_type) \
            and shapes.get("head_dim_k") in FLA_HEAD_DIMS \
            and shapes.get("head_dim_v") in FLA_HEAD_DIMS:
        return "fla"
    return "torch"


def require_cpu(what: str, *tensors: torch.Tensor | None) -> None:
    """ValueError unless every tensor is on the CPU: the compiled kernel reads raw host
    pointers, and a GPU pointer would be read as host memory."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{what} is the compiled CPU kernel, got a tensor on "
                             f"{t.device}; use the PyTorch path (or a CUDA kernel) there")


def installed() -> dict[str, str | None]:
    """Each fast kernel's package version, None when it does not import."""
    from importlib import metadata
    out: dict[str, str | None] = {}
    for name, (package, _, _) in FAST_KERNELS.items():
        version = None
        if fast_kernel(name) is not None:
            try:
                version = metadata.version(package)
            except metadata.PackageNotFoundError:
                version = "unknown"
        out[name] = version
    return out
