"""Process-level CPU settings (gam.runtime)."""

import ctypes.util
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
