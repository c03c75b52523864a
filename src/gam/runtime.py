"""Process and device settings, in one place: device resolution, CPU threads, autocast dtypes
and allocator tuning. Everything above (models, training, benchmarks, the CLI) calls these.

- :func:`resolve_device`: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a ``torch.device``;
- :func:`set_threads` / :func:`auto_threads`: ``--threads``, or fewer than one per core when
  other processes already keep the cores busy (the load-average rule);
- :data:`DTYPES`, :func:`autocast_context`, :func:`autocast_dtype`: the ``fp32`` / ``bf16`` /
  ``fp16`` settings as torch dtypes and autocast regions;
- :func:`tune_cpu_allocator`: glibc allocator thresholds (below).

Allocator. PyTorch's CPU allocator hands every tensor to ``malloc``. With glibc's defaults,
blocks above a dynamic threshold come from fresh ``mmap`` pages and free heap above 128 KiB is
returned to the OS, so a training step that allocates and frees the same large activations
again and again pays page faults on each of them. Raising ``M_MMAP_THRESHOLD`` (to glibc's
32 MiB cap) and ``M_TRIM_THRESHOLD`` keeps freed memory in the heap for reuse (measured gains:
docs/results.md). The cost is that the process keeps its peak heap instead of shrinking after
it.

``gam train`` and ``gam bench throughput`` call :func:`tune_cpu_allocator`; set
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
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied


# --------------------------------------------------------------------------------- devices
def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` -> this process's GPU (``local_rank``
    under torchrun); ``cuda:N`` -> that GPU. ValueError for CUDA when none is available and for
    an unknown name."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available "
                             "(use --device cpu or auto)")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device("cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
