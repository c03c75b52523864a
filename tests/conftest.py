"""Fixtures shared by every test folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@contextlib.contextmanager
def _private_gam_environment(cache: Path) -> Iterator[Path]:
    """A private tokenizer / token-id cache, no $GAM_DATA_DIR, the hub never contacted;
    the previous environment restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("GAM_CACHE_DIR", "GAM_DATA_DIR", "HF_HUB_OFFLINE")}
    os.environ["GAM_CACHE_DIR"] = str(cache)
    os.environ.pop("GAM_DATA_DIR", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield cache
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA device: skipped without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (the `cuda` marker)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """A test not marked ``cuda`` runs on the CPU even on a GPU machine: ``--device auto``
    (the default of every command) resolves to the CPU there, so that the CPU tests
    (bit-exact resume included) stay CPU tests. Commands the tests run pin ``--device cpu``
    as well; this catches the ones that do not."""
    if "cuda" not in request.keywords and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # and for the processes they start


@pytest.fixture(scope="session")
def private_gam_environment():
    """``with private_gam_environment(cache_dir): ...`` isolates a test module's gam caches."""
    return _private_gam_environment


# The real data: ../shared/data relative to the repository. Tests hand it to gam only through
# --data-dir or $GAM_DATA_DIR; no command looks for it on its own.
SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real-data test: no {SHARED_DATA_DIR} folder beside the repository")
    return SHARED_DATA_DIR


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: with several threads OpenMP's hand-offs dominate (seconds per test on a
    busy 2-core machine). One thread for the test, the setting restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
