"""What a reader needs to interpret a benchmark's numbers: hardware, software, threads, load,
date, TF32 and the kernel every family's ops run (``environment``, ``finish_environment``) and
the command as typed (``command_line``)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gam
from gam.bench.kernel_report import kernel_table
from gam.runtime import tf32_enabled


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
    env["tf32"] = tf32_enabled() if device.type == "cuda" else None
    # which kernel each family's ops run here (fp32 / bf16): gam.bench.kernel_report
    env["kernels"] = kernel_table(device.type)
    return env


def finish_environment(env: dict[str, Any]) -> dict[str, Any]:
    """Add what is only known at the end of a run (the load average then, and the date)."""
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    env["date_end"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env


def command_line(command: str, argv: Sequence[str]) -> str:
    """The command as typed through the ``gam`` CLI (``gam bench <command> ...``)."""
    return shlex.join(["gam", "bench", command, *argv])


def device_types() -> list[str]:
    """The device types of this machine that ``gam`` can run on: cpu, and cuda when present."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def system_report() -> dict[str, Any]:
    """``gam env``: torch, CUDA and TF32 facts and, per device type, the kernel of every
    registered family's every op."""
    from gam.models.ops import kernels
    from gam.runtime import tf32_default

    facts: dict[str, Any] = {
        "gam": getattr(gam, "__version__", None), "torch": torch.__version__,
        "python": platform.python_version(), "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda, "cpu_model": _cpu_model(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "tf32_default_on_cuda": tf32_default(),
        "fast_kernels_installed": kernels.installed(),
    }
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        facts.update(gpu=torch.cuda.get_device_name(index),
                     gpu_count=torch.cuda.device_count(),
                     compute_capability=".".join(map(str, torch.cuda.get_device_capability(index))),
                     cudnn=torch.backends.cudnn.version(),
                     bf16_supported=torch.cuda.is_bf16_supported())
    return {"facts": facts, "kernels": {d: kernel_table(d) for d in device_types()}}


def format_system_report(report: dict[str, Any]) -> str:
    """``system_report`` as text: the facts, then one table per device type (family, op,
    kernel in fp32, kernel under bf16 autocast)."""
    lines = [f"{key}: {value}" for key, value in report["facts"].items()]
    for device_type, table in report["kernels"].items():
        lines += ["", f"kernels on {device_type} (fp32 / bf16 autocast):"]
        for family, ops in table["families"].items():
            if "error" in ops:
                lines.append(f"  {family:<22} could not be probed: {ops['error']}")
                continue
            if not ops:
                lines.append(f"  {family:<22} (no dispatched ops: PyTorch throughout)")
            for op, choices in ops.items():
                lines.append(f"  {family:<22} {op:<20} {choices.get('fp32', '-'):<14} "
                             f"{choices.get('bf16', '-')}")
        for name, reason in table["disabled"].items():
            lines.append(f"  disabled after failing: {name} ({reason})")
    return "\n".join(lines)
