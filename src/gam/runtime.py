"""Process and device settings, in one place: device resolution, CPU threads, autocast dtypes
and allocator tuning. Everything above (models, training, benchmarks, the CLI) calls these.

- :func:`resolve_device`: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a ``torch.device``;
- :func:`set_threads` / :func:`auto_threads`: ``--threads``, or fewer than one per core when
  other processes already keep the cores busy (the load-average rule);
- :data:`DTYPES`, :func:`autocast_context`, :func:`autocast_dtype`: the ``fp32`` / ``bf16`` /
  ``fp16`` settings as torch dtypes and autocast regions;
- :func:`tune_cpu_allocator`: glibc allocator thresholds (below);
- :func:`set_tf32`: TF32 for float32 matmuls and convolutions on CUDA (below).

TF32. On Ampere and later GPUs, float32 matmuls and cuDNN convolutions can run on the tensor
cores with TF32 inputs (10-bit mantissa, float32 accumulation), several times faster. PyTorch
leaves it off for matmuls; gam turns it **on for CUDA devices by default** (as most training
code does: it affects only ``--dtype fp32`` runs; bf16 autocast matmuls are unchanged).
``gam train --no-tf32``, ``gam bench ... --no-tf32`` or ``GAM_TF32=0`` keep full float32.
The setting in force is recorded in a run's ``config.json`` (``runtime.tf32``) and in every
benchmark's ``results.json`` (``environment.tf32``). Only the torch >= 2.9 API
(``fp32_precision``) is used: mixing it with the legacy ``allow_tf32`` flags is an error.

Allocator. PyTorch's CPU allocator hands every tensor to ``malloc``. With glibc's defaults,
blocks above a dynamic threshold come from fresh ``mmap`` pages and free heap above 128 KiB is
returned to the OS, so a training step that allocates and frees the same large activations
again and again pays page faults on each of them. Raising ``M_MMAP_THRESHOLD`` (to glibc's
32 MiB cap) and ``M_TRIM_THRESHOLD`` keeps freed memory in the heap for reuse; blocks above the
32 MiB cap would still be mapped afresh every time (long sequences, large batches: the cost per
token then grows with the length), so ``M_MMAP_MAX`` = 0 serves every block from the heap
(glibc still maps memory when the heap cannot grow). Measured gains: docs/results.md. The cost
is that the process keeps its peak heap, fragmentation included, instead of shrinking after it.

``gam train``, ``gam bench throughput`` and the timed runs of ``gam bench scale`` call
:func:`tune_cpu_allocator`; set
``GAM_MALLOC_TUNING=0`` to leave the allocator alone. Library users can call it themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest accepted value on 64-bit systems
TRIM_THRESHOLD_BYTES = 2**30

_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Apply the glibc ``mallopt`` settings above once per process; True if they are in force.

    A no-op returning False where there is no glibc (macOS, musl) or when
    ``GAM_MALLOC_TUNING=0``."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("GAM_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(option, value) for option, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_MMAP_MAX, 0)))
    return _applied


# --------------------------------------------------------------------------------- devices
def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` -> this process's GPU (``local_rank``
    under torchrun); ``cuda:N`` -> that GPU. ValueError for CUDA when none is available and for
    an unknown name. For a CUDA device, applies the TF32 default (:func:`set_tf32`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available "
                             "(use --device cpu or auto)")
        if name == "cuda":
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        else:
            device = torch.device(name)
        set_tf32(device)  # the process's default ($GAM_TF32); gam train may override it
        return device
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device("cpu")


def host_sync_is_cheap(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host (``int(t)``, ``nonzero``) costs nothing:
    on the CPU it does; on an accelerator it waits for all queued work, so per-step checks
    use sync-free forms there (masks, ``torch._assert_async``)."""
    return device.type == "cpu"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TF32_ENV = "GAM_TF32"


def tf32_default() -> bool:
    """TF32 on CUDA unless ``$GAM_TF32`` says 0/false/no/off."""
    return os.environ.get(TF32_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def set_tf32(device: torch.device | str, enabled: bool | None = None) -> bool | None:
    """On a CUDA device, let float32 matmuls and cuDNN convolutions use TF32 (``enabled``;
    None: :func:`tf32_default`) and return the setting; None (nothing changed) elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    enabled = tf32_default() if enabled is None else bool(enabled)
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    return enabled


def tf32_enabled() -> bool:
    """Whether float32 CUDA matmuls may use TF32 now."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":  # not set through the new API: the global default decides
        return torch.get_float32_matmul_precision() != "highest"
    return precision == "tf32"


# --------------------------------------------------------------------------------- threads
def auto_threads() -> int | None:
    """CPU threads to use when the user did not say (``--threads``).

    None (torch's default, one per core) unless the machine is already busy: PyTorch's CPU
    kernels end every parallel region in a barrier, so when other processes keep the cores
    occupied each op waits for a descheduled thread (see docs/design.md). Then use only the
    cores left idle (at least 1). ``OMP_NUM_THREADS`` (set by torchrun for several processes)
    always wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    idle = int(cores - load + 0.5)
    if idle >= cores:
        return None
    return max(1, min(cores, idle))


def set_threads(threads: int | None, follow_load: bool = True) -> int:
    """Apply ``--threads``; when None, :func:`auto_threads` (``follow_load``) or torch's
    default. Returns the count in use. ValueError for a count below 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if threads is None and follow_load:
        threads = auto_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------- dtypes
def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16, a no-op for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a CUDA device (use bf16 on CPU)")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul of ``x`` (``x.dtype`` outside autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
