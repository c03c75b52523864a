"""Helpers shared by the ``gam bench`` commands.

- device and thread setup (``resolve_device``, ``setup_threads``);
- timing with warm-up, reporting median and min (``time_fn``; CUDA events on a GPU);
- peak memory (``MemoryMeter``: ``torch.cuda.max_memory_allocated`` on a GPU, the process's
  peak resident set size ``VmHWM`` on a CPU);
- the environment of a run (``environment``: CPU model, torch version, threads, device, date...);
- output: ``results.json`` (with ``environment`` and the command line) and ``results.md``
  (``write_results``, ``markdown_table``), PNGs via matplotlib's object API (no pyplot state);
- log-log least-squares fits (``loglog_fit``);
- subprocess workers (``run_worker`` / ``worker_main``): a command runs one configuration in a
  fresh ``python -m gam.bench.<command> --worker JSON`` process, which prints one
  ``GAM_BENCH_RESULT {json}`` line per finished record. The parent enforces a wall-clock limit
  (the child's process group is killed), keeps every record printed before a timeout or a
  crash, and maps a child killed by SIGKILL (the kernel's OOM killer) to status ``"oom"``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULT_PREFIX = "GAM_BENCH_RESULT "
STATUSES = ("ok", "oom", "timeout", "error", "skipped", "unavailable")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- arguments
def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options every command takes; the dispatcher adds them before the command's own."""
    group = parser.add_argument_group("common options")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto = cuda if available, else cpu (default: auto)")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch.set_num_threads(N) in every process of the run (default: "
                            "torch's default); reported in results.json")
    group.add_argument("--out", type=Path, default=Path("runs") / "bench" / command,
                       metavar="DIR", help=f"output folder for results.json, results.md and "
                                           f"PNGs (default: runs/bench/{command})")
    group.add_argument("--quick", action="store_true",
                       help="a small version of the benchmark (a few minutes on a CPU)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def parse_int_list(text: str) -> list[int]:
    """'256,512' -> [256, 512] (for options that also accept a comma-separated list)."""
    return [int(v) for v in text.replace(",", " ").split()]


# ------------------------------------------------------------------------- device, threads
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def setup_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (if given) and return the number in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested lists, tuples, dicts and dataclass-like objects."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


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


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def is_oom_error(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                            "failed to allocate", "std::bad_alloc"))


# ---------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve()
    for parent in root.parents:
        if (parent / ".git").exists():
            try:
                out = subprocess.run(["git", "-C", str(parent), "rev-parse", "HEAD"],
                                     capture_output=True, text=True, timeout=5)
            except (OSError, subprocess.SubprocessError):
                return None
            return out.stdout.strip() or None
    return None


def environment(device: torch.device | str, threads: int | None = None) -> dict[str, Any]:
    """What a reader needs to interpret the numbers: hardware, software, threads, date."""
    import numpy as np

    import gam

    device = torch.device(device)
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "memory_total_gb": mem,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gam": getattr(gam, "__version__", None),
        "git_commit": _git_commit(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg")
        else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def finish_environment(env: dict[str, Any]) -> dict[str, Any]:
    """Add what is only known at the end of a run (the load average then, and the date)."""
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    env["date_end"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env


def default_memory_cap(device: torch.device, max_memory_gb: float | None) -> int | None:
    """Bytes a CPU worker may add to its address space: ``max_memory_gb`` if given (0 = no
    cap), else 85% of the memory available now. None on a GPU (CUDA reserves address space)."""
    if device.type != "cpu":
        return None
    if max_memory_gb is None:
        avail = available_memory_bytes()
        return int(0.85 * avail) if avail else None
    return int(max_memory_gb * 2**30) if max_memory_gb > 0 else None


def command_line(command: str, argv: Sequence[str]) -> str:
    """The command as typed through the ``gam`` CLI (``gam bench <command> ...``)."""
    return shlex.join(["gam", "bench", command, *argv])


# ---------------------------------------------------------------------------------- output
def _finite(obj: Any) -> Any:
    """NaN/inf -> None and Paths -> str, so that results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def style_log_axis(ax, title: str, unit: str, xlabel: str, logy: bool = True) -> None:
    """The look every length/context plot shares: log2 x, optional log y, grid, legend."""
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def write_results(out_dir: Path | str, results: dict[str, Any], markdown: str) -> Path:
    """Write ``results.json`` (strict JSON) and ``results.md``; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump(_finite(results), f, indent=2, allow_nan=False)
        f.write("\n")
    (out / "results.md").write_text(markdown.rstrip() + "\n")
    return out


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def environment_markdown(env: dict[str, Any], command: str) -> str:
    keys = ("date", "device", "gpu", "cpu_model", "cpu_capability", "threads", "torch",
            "git_commit", "load_average", "load_average_end")
    parts = [f"{k}: {env[k]}" for k in keys if env.get(k) is not None]
    return f"Command: `{command}`\n\nEnvironment: " + "; ".join(parts) + "."


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.5):
    """A matplotlib Figure with ``ncols`` axes, without pyplot (no GUI backend, no global
    state); save with ``fig.savefig(path)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


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


# --------------------------------------------------------------------------------- workers
def run_worker(module: str, payload: dict[str, Any], timeout: float | None = None
               ) -> tuple[str, list[dict[str, Any]], str | None]:
    """Run ``python -m <module> --worker <payload JSON>`` in a fresh process.

    Returns ``(status, records, error)``: status is ``ok`` (exit code 0), ``timeout`` (the
    wall-clock limit was reached: the child's process group is killed), ``oom`` (killed by
    SIGKILL, which on Linux is what the OOM killer sends) or ``error``; records are the
    ``GAM_BENCH_RESULT`` lines the child printed, kept in every case.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(payload)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    status, error = "ok", None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        status, error = "timeout", f"exceeded the limit of {timeout:g} s"
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    records = []
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            records.append(json.loads(line[len(RESULT_PREFIX):]))
    if status == "ok" and proc.returncode != 0:
        tail = (stderr or "").strip().splitlines()[-3:]
        if proc.returncode == -signal.SIGKILL:
            status = "oom"
            error = "worker killed by SIGKILL (out of memory: the kernel's OOM killer)"
        else:
            status = "error"
            error = f"worker exited with code {proc.returncode}: " + " | ".join(tail)
    return status, records, error


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def emit(record: dict[str, Any]) -> None:
    """Worker side: report one finished record to the parent."""
    print(RESULT_PREFIX + json.dumps(_finite(record)), flush=True)


def worker_main(fn: Callable[[dict[str, Any]], None], argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gam.bench.<command> --worker JSON``: set threads, call
    ``fn(payload)`` (which calls ``emit``); an exception that escapes is reported as one record
    with status ``oom`` or ``error``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m gam.bench.<command> --worker PAYLOAD_JSON "
              "(internal; use `gam bench <command>`)", file=sys.stderr)
        return 2
    payload = json.loads(argv[1])
    setup_threads(payload.get("threads"))
    try:
        fn(payload)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        emit({"status": "oom" if is_oom_error(exc) else "error",
              "error": f"{type(exc).__name__}: {str(exc)[:500]}",
              "traceback": traceback.format_exc()[-2000:]})
        return 0
    return 0


def model_available(name: str) -> str | None:
    """None if ``build_model(name)`` can be imported, else the reason (e.g. a family whose
    module is not written yet)."""
    from gam.models.registry import config_class

    try:
        config_class(name)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def error_text(exc: BaseException) -> str:
    """An error as one line for a command-line user: a missing corpus says ``--data-dir``
    (not the library's ``data_dir=``), and a multi-line message is joined."""
    text = getattr(exc, "cli_message", None) or str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) \
        or type(exc).__name__
