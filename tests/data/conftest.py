"""Shared fixtures for the gam.data tests.

Every test runs with a private cache (``$GAM_CACHE_DIR`` in ``tmp_path``), without
``$GAM_DATA_DIR`` and with the Hugging Face hub unreachable (``datasets`` made unimportable),
so results never depend on the machine's caches or network. Tests that exercise the hub path
install a fake ``datasets`` module instead.
"""

from __future__ import annotations

import lzma
import sys
from pathlib import Path

import pytest

try:  # the package may not be installed (pip install -e .); fall back to the src layout
    import gam.data  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the environment was set up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    import gam.data  # noqa: F401


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Private cache dir, no data dir from the environment, no hub."""
    cache = tmp_path_factory.mktemp("gam-cache")
    monkeypatch.setenv("GAM_CACHE_DIR", str(cache))
    monkeypatch.delenv("GAM_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` -> ImportError
    return cache


@pytest.fixture
def cache_dir(isolated_environment) -> Path:
    return isolated_environment


@pytest.fixture(scope="session")
def shared_data_dir(data_dir) -> Path:
    """The real data folder (``../shared/data`` relative to the repository), or skip."""
    return data_dir


def write_text(path: Path, text: str, xz: bool = False) -> Path:
    """Write ``text`` to ``path`` (or ``path.xz`` compressed) and return the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if xz:
        path = path.with_name(path.name + ".xz")
        with lzma.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def make_wikitext_dir(root: Path, tag: str = "A", xz: bool = False) -> Path:
    """A miniature WikiText-2 raw layout under ``root`` whose rows mention ``tag``."""
    folder = root / "wikitext-2-raw"
    for split, n in (("train", 6), ("valid", 3), ("test", 4)):
        lines = [" "] + [f" {tag} {split} line {i} . " for i in range(n)]
        write_text(folder / f"wiki.{split}.raw", "\n".join(lines) + "\n", xz=xz)
    return root


@pytest.fixture(name="write_text")
def write_text_fixture():
    """The :func:`write_text` helper (tests cannot import conftest under importlib mode)."""
    return write_text


@pytest.fixture(name="make_wikitext_dir")
def make_wikitext_dir_fixture():
    """The :func:`make_wikitext_dir` helper."""
    return make_wikitext_dir
