"""Benchmarks' tests: tiny configurations, no timing assertions."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_results(out: Path) -> dict:
    with open(out / "results.json") as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    return json.loads(text)


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC


def assert_environment(results: dict) -> None:
    env = results["environment"]
    for key in ("cpu_model", "torch", "threads", "device", "date"):
        assert env.get(key) is not None, key
    assert "tf32" in env and env["kernels"]["families"]  # which kernel each op ran
    assert results["command"].startswith("gam bench ")


class Checks:
    load_results = staticmethod(load_results)
    assert_png = staticmethod(assert_png)
    assert_environment = staticmethod(assert_environment)


@pytest.fixture
def check() -> Checks:
    """Helpers to read and validate a command's output folder."""
    return Checks()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"
