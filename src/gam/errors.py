"""Which errors a user can fix, and how the commands print them: one line, no traceback.

The rule every command (``gam train / eval / generate``, ``gam bench``, ``gam export``) follows
through :func:`user_error_message`:

- bad input is a ``ValueError`` (validation code raises :class:`UsageError`, a ``ValueError``
  whose message names the value and what was expected), a missing or unreadable file an
  ``OSError``, an unknown name a ``KeyError``, a missing optional package an ``ImportError``:
  printed as ``PROG: error: ...`` on one line;
- running out of memory (``MemoryError``, ``torch.OutOfMemoryError``, the allocator's
  "can't allocate memory") is one line saying which setting to lower;
- a full disk or a file-size limit (``ENOSPC`` / ``EFBIG``) is one line naming the file and
  the cause, even when the ``OSError`` arrives wrapped in another error (``torch.save``);
- anything else (``TypeError``, ``AttributeError``, a ``RuntimeError`` of torch...) is a bug of
  gam: the traceback is shown.

This module imports nothing of ``gam``: every layer may use it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator

import torch

__all__ = ["DISK_ERRNOS", "EXIT_ERROR", "EXIT_INTERRUPTED", "UsageError",
           "available_memory_bytes", "disk_error", "ignore_file_size_signal",
           "is_oom_error", "one_line", "print_user_error", "run_reporting_errors",
           "user_error_message"]

EXIT_ERROR = 2  # an error the user can fix (argparse's status for a usage error too)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


class UsageError(ValueError):
    """A value the user gave is wrong; the message names it and says what was expected."""


# the errors whose cause is outside the program: a full disk, a file-size limit, a quota
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large (the "
               "file-size limit, ulimit -f)", errno.EDQUOT: "disk quota exceeded"}

# the errors the commands print as one line (see the module docstring)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, ImportError)


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a multi-line message, e.g. where a corpus was looked
    for, is joined); ``cli_message`` when the error carries one (a missing corpus says
    ``--data-dir``, not the library's ``data_dir=``)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = getattr(exc, "cli_message", None) or text
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) \
        or type(exc).__name__


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (``MemAvailable`` of ``/proc/meminfo``),
    or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_oom_error(exc: BaseException) -> bool:
    """Did ``exc`` come from running out of (CPU or GPU) memory?"""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                            "failed to allocate", "std::bad_alloc"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


_ALLOCATION = re.compile(r"(?i)tried to allocate ([\d.]+(?: [KMGT]i?B)?)")
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) reports one


def disk_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` with a full-disk / file-size errno in ``exc`` or its causes (torch's zip
    writer reports a failed write as "unexpected pos ..." with the OSError as its context;
    safetensors as "... (os error 28)" in its message)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        match = _OS_ERROR_TEXT.search(str(e))
        if match and int(match.group(1)) in DISK_ERRNOS:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
    return None


def ignore_file_size_signal() -> None:
    """Ignore SIGXFSZ, so that a write past the file-size limit fails with ``EFBIG`` (an
    ``OSError`` the commands report) instead of killing the process without a word."""
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave the signal as it is
            pass


def user_error_message(exc: BaseException, memory_hint: str = "a smaller batch or model",
                       also: tuple[type[BaseException], ...] = ()) -> str | None:
    """The one line to print for an error the user can fix, or None for a bug (whose traceback
    should be shown). ``memory_hint``: what to lower when memory ran out; ``also``: more error
    types the caller knows to be the user's (e.g. a corrupted checkpoint)."""
    disk = disk_error(exc)
    if disk is not None:
        where = f" {os.fsdecode(disk.filename)}" if disk.filename else ""
        return (f"could not write{where}: {DISK_ERRNOS[disk.errno]} "
                f"({errno.errorcode[disk.errno]}); free space or raise the limit and retry")
    if is_oom_error(exc):
        asked = _ALLOCATION.search(str(exc))
        size = ""
        if asked:  # torch's CPU allocator says bytes, its CUDA one a size with a unit
            amount = asked.group(1)
            size = f" (one allocation of {int(amount) / 2**30:.2f} GiB)" if amount.isdigit() \
                else f" (one allocation of {amount})"
        return f"out of memory{size}; retry with {memory_hint}"
    if isinstance(exc, USER_ERRORS + also):
        return one_line(exc)
    return None


def print_user_error(prog: str, exc: BaseException, memory_hint: str = "a smaller batch or "
                     "model", also: tuple[type[BaseException], ...] = ()) -> bool:
    """Print ``PROG: error: ...`` (:func:`user_error_message`) on stderr and return True, or
    return False for a bug, which the caller re-raises."""
    message = user_error_message(exc, memory_hint, also)
    if message is None:
        return False
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return True


def run_reporting_errors(prog: str, command: Callable[[], int | None],
                         memory_hint: str = "a smaller batch or model") -> int:
    """``command()``'s exit status; an interrupt is one line and status 130, an error the user
    can fix one line and status 2 (:func:`print_user_error`), a bug re-raised."""
    try:
        return int(command() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a user's error is one line, a bug is re-raised
        if print_user_error(prog, exc, memory_hint):
            return EXIT_ERROR
        raise
