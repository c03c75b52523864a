"""Writing files safely and the cache root, for every layer of the package (it imports
only ``gam.errors``): atomic writes with the umask's mode, and where caches live.

Everything the package writes for a user (checkpoints, run folders, reports, cached token ids,
tokenizers, the compiled scan kernel) goes through :func:`atomic_write`, so that an interrupted
process never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from gam.errors import disk_error

try:
    import fcntl
except ImportError:  # not a POSIX system (Windows): nothing is locked there
    fcntl = None

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

logger = logging.getLogger(__name__)

# The random part of a tempfile.mkstemp name: 8 characters of this set.
_MKSTEMP_RANDOM = r"[a-z0-9_]{8}"



def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), to compare it with a file."""
    return json.loads(json.dumps(value))

def safe_name(name: str, max_len: int = 48) -> str:
    """A file-system friendly version of ``name`` (e.g. ``text:/a/b.txt`` -> ``text_a_b.txt``)."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "corpus"
    return cleaned[-max_len:]


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it, which briefly changes it for every thread;
    Linux reports it in ``/proc/self/status``, so that is tried first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) would give under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def mkstemp_default_mode(path: Path) -> tuple[int, str]:
    """``tempfile.mkstemp`` beside ``path``, with the mode a plain ``open()`` would give.

    mkstemp creates its file 0600 (private), and ``os.replace`` keeps that mode: every file
    written atomically would be unreadable for the group and others, unlike what the user's
    umask asks for.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp_name)
        raise
    return fd, tmp_name


def temporary_name_pattern(name: str) -> re.Pattern[str]:
    """The names :func:`mkstemp_default_mode` gives the temporary siblings of a file ``name``
    (``.NAME.<8 random characters>.tmp``)."""
    return re.compile(re.escape(f".{name}.") + _MKSTEMP_RANDOM + re.escape(".tmp"))


def remove_interrupted_writes(folder: str | os.PathLike[str], names: tuple[str, ...],
                              extra: tuple[re.Pattern[str], ...] = ()) -> list[Path]:
    """Delete the temporary files that writes of ``names`` in ``folder`` killed mid-way left
    (:func:`atomic_write`'s, and those matching a pattern of ``extra``); returns them.

    Only call it where no other process may be writing these files (e.g. under a lock): a
    temporary file of a write in progress looks the same.
    """
    folder = Path(folder)
    patterns = [temporary_name_pattern(name) for name in names] + list(extra)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        if any(p.fullmatch(entry.name) for p in patterns) and entry.is_file():
            try:
                entry.unlink()
            except OSError:
                continue
            removed.append(entry)
    if removed:
        logger.warning("removed %d temporary file(s) left by an interrupted save: %s",
                       len(removed), ", ".join(str(p) for p in removed))
    return removed


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mkdtemp_default_mode(parent: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """``tempfile.mkdtemp`` in ``parent``, with the mode a plain ``mkdir()`` would give
    (mkdtemp makes it 0700, which a rename into place would keep)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(folder, default_mode(directory=True))
    return folder


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None],
                 fsync: bool = False) -> None:
    """Write a file through a temporary sibling and ``os.replace`` it into place (the one
    atomic write of the package; ``fsync``: flush it to the disk before the rename).

    Readers (including other processes sharing the cache) never see a half-written file, and a
    crash mid-write leaves at most a stray temporary file, never a corrupt cache entry. The
    file gets the umask's mode (e.g. 0644), as if written with ``open()``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = mkstemp_default_mode(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise_naming_disk_error(exc, path)
        raise


def raise_naming_disk_error(exc: BaseException, path: str | os.PathLike[str]) -> None:
    """If ``exc`` comes from a full disk or the file-size limit and names no file (a failed
    ``write``; torch's or safetensors' writers wrap it), raise an ``OSError`` naming ``path``
    (the file being written) from it; otherwise return, for the caller to re-raise ``exc``."""
    full = disk_error(exc)
    if full is not None and not full.filename:
        raise OSError(full.errno, full.strerror, str(path)) from exc


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """:func:`atomic_write` of ``data``, synced to the disk."""
    atomic_write(path, lambda handle: handle.write(data), fsync=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys, written as :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def default_cache_dir() -> Path:
    """The one cache root (token ids, tokenizers, ListOps data, the compiled scan kernel):
    ``$GAM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/gam``, else ``~/.cache/gam``."""
    env = os.environ.get("GAM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gam"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The explicit ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


class LockHeldError(OSError):
    """Another process holds the lock file ``path``; ``holder`` is its pid (or "unknown")."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by another process (pid {holder})")
        self.path, self.holder = path, holder


@contextmanager
def hold_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock file ``path`` (created if needed) for the block, or raise
    :class:`LockHeldError` at once if another process holds it.

    The lock is the kernel's (``flock``): it goes with the process however that ends, so a
    crash never leaves a stale lock. The file holds the pid of the process that has it.
    Where the system has no ``flock`` (Windows) the block runs unlocked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeldError(path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock

