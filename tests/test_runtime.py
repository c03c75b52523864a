"""Process-level CPU settings (gam.runtime)."""

import ctypes.util
import os
import sys

import pytest
import torch

import gam.runtime as runtime


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    return runtime


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="mallopt is glibc's")
def test_allocator_tuning_applies_once_and_keeps_results_identical(fresh, monkeypatch):
    monkeypatch.delenv("GAM_MALLOC_TUNING", raising=False)
    torch.manual_seed(0)
    a = torch.randn(512, 512)
    before = a @ a
    assert fresh.tune_cpu_allocator() is True
    assert fresh.tune_cpu_allocator() is True  # idempotent
    assert torch.equal(a @ a, before)


def test_allocator_tuning_can_be_switched_off(fresh, monkeypatch):
    monkeypatch.setenv("GAM_MALLOC_TUNING", "0")
    assert fresh.tune_cpu_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None
                    or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="mallopt and mallinfo2 (glibc >= 2.33) are glibc's")
@pytest.mark.parametrize("tuned", [False, True])
def test_tuned_allocator_serves_blocks_above_the_mmap_cap_from_the_heap(tuned):
    """A 64 MiB tensor (above glibc's 32 MiB cap on M_MMAP_THRESHOLD) is a fresh mapping with
    glibc's defaults, paid in page faults every time it is allocated; tuned, it comes from the
    heap. mallinfo2's hblkhd counts the bytes in mappings. Its own process: tuning is global."""
    import subprocess

    code = f"""
import ctypes, torch
import gam.runtime as runtime
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if {tuned}:
    assert runtime.tune_cpu_allocator()
before = libc.mallinfo2().hblkhd
x = torch.ones(16 * 2**20)  # 64 MiB
print(libc.mallinfo2().hblkhd - before)
"""
    env = {**os.environ, "GAM_MALLOC_TUNING": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout
    mapped = int(out.split()[-1])
    if tuned:
        assert mapped < 2**20, mapped
    else:
        assert mapped >= 64 * 2**20, mapped
