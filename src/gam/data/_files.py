"""Reading text files that may be stored plain or xz-compressed, and writing cache files safely.

The shared data folder ships every file as ``*.xz`` to save space, while users who download
the official archives get plain files. Every loader therefore asks for a file by its plain
name and gets whichever copy exists (the plain one wins, it is faster to read).
"""

from __future__ import annotations

import lzma
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

XZ_SUFFIX = ".xz"


def find_text_file(folder: Path, name: str) -> Path | None:
    """Return ``folder/name`` if it exists, else ``folder/name.xz`` if that exists, else None."""
    plain = folder / name
    if plain.is_file():
        return plain
    packed = folder / (name + XZ_SUFFIX)
    if packed.is_file():
        return packed
    return None


def describe_text_file(folder: Path | str, name: str) -> str:
    """How a wanted file is named in error messages: ``folder/name[.xz]``."""
    return f"{Path(folder) / name}[{XZ_SUFFIX}]"


def open_text(path: Path) -> IO[str]:
    """Open a UTF-8 text file, decompressing on the fly when its name ends in ``.xz``.

    Universal-newline mode is used on purpose, so a copy with CRLF line endings yields the same
    rows (and the same fingerprint) as the LF original.
    """
    if path.name.endswith(XZ_SUFFIX):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_lines(path: Path) -> Iterator[str]:
    """Yield the lines of a text file without their line terminator."""
    with open_text(path) as handle:
        for line in handle:
            yield line[:-1] if line.endswith("\n") else line


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, max_len: int = 48) -> str:
    """A file-system friendly version of ``name`` (e.g. ``text:/a/b.txt`` -> ``text_a_b.txt``)."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "corpus"
    return cleaned[-max_len:]


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through a temporary sibling and ``os.replace`` it into place.

    Readers (including other processes sharing the cache) never see a half-written file, and a
    crash mid-write leaves at most a stray temporary file, never a corrupt cache entry.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise


def default_cache_dir() -> Path:
    """Cache root: ``$GAM_CACHE_DIR`` if set, else ``~/.cache/gam``."""
    env = os.environ.get("GAM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gam"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The explicit ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
