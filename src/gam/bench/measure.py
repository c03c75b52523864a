"""Measuring a benchmark configuration: wall-clock timing with warm-up (CUDA events on a GPU),
peak memory (``MemoryMeter``: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak
resident set size ``VmHWM`` on a CPU), address-space limits for CPU workers, and log-log
least-squares fits of the measurements (out-of-memory detection is ``gam.errors``')."""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gam.errors import available_memory_bytes
from gam.models.blocks import state_nbytes
from gam.runtime import synchronize


# ---------------------------------------------------------------------------------- timing
def time_fn(fn: Callable[[], Any], device: torch.device | str, warmup: int = 1,
            repeats: int = 3) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    On a GPU each run is timed with CUDA events (kernel time between two stream marks), on a
    CPU with ``time.perf_counter``. Returns median, min and all times in milliseconds.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}


# ---------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_cpu_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc ``malloc_trim``), so that
    the resident set size reflects live data only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM, or ru_maxrss where /proc is missing."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there
            kb //= 1024
    return kb * 1024


class MemoryMeter:
    """Peak memory of a region of code, as growth over a baseline taken at ``start()``.

    GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the bytes
    allocated at ``start()`` (tensors only; the caching allocator's reserve is not counted).

    CPU: the process's peak resident set size (``VmHWM``) minus its RSS at ``start()``. Free
    heap pages are returned to the OS first and the kernel's peak counter is reset to the
    current RSS (``/proc/self/clear_refs``), so the growth is the largest amount of extra memory
    the OS had to provide during the region: tensors, their allocator slack, and library
    workspaces (oneDNN, OpenMP). PyTorch's CPU allocator does not cache freed blocks, so this is
    the CPU analogue of ``max_memory_allocated``. Without ``clear_refs`` the baseline is the peak
    so far, which is only exact in a fresh process (the commands measure in one).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.baseline = 0
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated at start"
            return
        release_cpu_memory()
        if _reset_peak_rss():
            self.baseline = current_rss_bytes() or peak_rss_bytes()
            self.method = "VmHWM after clear_refs reset - VmRSS at start"
        else:
            self.baseline = peak_rss_bytes()
            self.method = "VmHWM (ru_maxrss) - VmHWM at start"

    def peak_bytes(self) -> int:
        """Absolute peak since ``start()`` (allocated bytes on GPU, RSS on CPU)."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes() - self.baseline)


# Bytes of every tensor in nested lists, tuples, dicts and objects: the models' own helper.
tensor_bytes = state_nbytes


def limit_address_space(extra_bytes: int | None) -> None:
    """CPU workers: cap the virtual address space at the current size plus ``extra_bytes``, so
    that a configuration that needs more memory fails with an allocation error (recorded as
    ``oom``) instead of pushing the machine into swap or the OOM killer."""
    if not extra_bytes:
        return
    vm_kb = _proc_status_kb("VmSize")
    if vm_kb is None:
        return
    limit = vm_kb * 1024 + int(extra_bytes)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def default_memory_cap(device: torch.device, max_memory_gb: float | None) -> int | None:
    """Bytes a CPU worker may add to its address space: ``max_memory_gb`` if given (0 = no
    cap), else 85% of the memory available now. None on a GPU (CUDA reserves address space)."""
    if device.type != "cpu":
        return None
    if max_memory_gb is None:
        avail = available_memory_bytes()
        return int(0.85 * avail) if avail else None
    return int(max_memory_gb * 2**30) if max_memory_gb > 0 else None


# ------------------------------------------------------------------------------------ fits
def loglog_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares line through (log x, log y): returns (slope, intercept), i.e. the
    exponent ``a`` and ``log c`` of y = c x^a. None with fewer than 2 usable points."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y, strict=True)
           if a is not None and b is not None and a > 0 and b > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    slope = sxy / sxx
    return slope, my - slope * mx
