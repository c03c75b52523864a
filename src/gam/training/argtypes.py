"""Command-line value types shared by ``gam train``, ``gam eval`` / ``generate`` and the
benchmarks (argparse ``type=`` functions: they raise ``argparse.ArgumentTypeError``, which
argparse prints as one line naming the option).

Every command takes its seeds, thread counts, vocabulary sizes, corpus names, output folders
and prompts through these, so that one check refuses a bad value before anything runs."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
from pathlib import Path
from typing import Any

from gam.data.text_corpus import TEXT_PREFIX, check_text_corpus_path
from gam.data.tokenizer import MAX_VOCAB_SIZE

SEED_LIMIT = 2**63  # seeds are signed 64-bit integers in torch and numpy


def _integer(text: str, minimum: int, what: str, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, "an integer >= 0")


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63)."""
    return _integer(text, 0, f"an integer from 0 to {SEED_LIMIT - 1}", SEED_LIMIT - 1)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count(text: str) -> int:
    """CPU threads: an integer from 1 to the cores this process may use (more threads than
    cores only wait for each other at every parallel region)."""
    cores = usable_cores()
    return _integer(text, 1, f"from 1 to the {cores} CPU core(s) this process may use", cores)


def vocab_size(text: str) -> int:
    """A tokenizer / model vocabulary size: an integer from 1 to ``MAX_VOCAB_SIZE``."""
    return _integer(text, 1, f"from 1 to {MAX_VOCAB_SIZE:,}", MAX_VOCAB_SIZE)


def finite_number(text: str) -> float:
    """A finite float (not nan or inf)."""
    value = number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _number_from(text: str, minimum: float, inclusive: bool) -> float:
    value = finite_number(text)
    if value < minimum or (value == minimum and not inclusive):
        raise argparse.ArgumentTypeError(
            f"must be a number {'>=' if inclusive else '>'} {minimum:g}, got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A finite float > 0."""
    return _number_from(text, 0.0, inclusive=False)


def nonneg_number(text: str) -> float:
    """A finite float >= 0."""
    return _number_from(text, 0.0, inclusive=True)


def utf8_text(text: str) -> str:
    """Text that is valid UTF-8 (an argument with bytes that are not is refused)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"expected UTF-8 text, got {text!r} (bytes that are "
                                         f"not UTF-8)") from None
    return text


def output_folder(text: str) -> Path:
    """A folder to write into: a UTF-8 path (it is recorded in the files written there) that is
    not a symlink loop and, if it exists, is a folder."""
    path = Path(utf8_text(text)).expanduser()
    try:
        if not path.is_dir() and path.exists():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
        path.resolve()
    except (OSError, RuntimeError) as exc:  # pathlib: RuntimeError for a symlink loop
        loop = isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP
        reason = "is a symlink loop" if loop else f"cannot be used ({exc})"
        raise argparse.ArgumentTypeError(f"{text} {reason}") from None
    return path


def dataset_name(text: str) -> str:
    """A corpus name; for ``text:PATH`` the path must be a text file or a folder."""
    utf8_text(text)
    if text.startswith(TEXT_PREFIX) and text[len(TEXT_PREFIX):]:
        try:
            check_text_corpus_path(Path(text[len(TEXT_PREFIX):]).expanduser())
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def optional_positive_int(text: str) -> int | None:
    """An integer >= 1, or ``none`` / ``0`` for None (no limit)."""
    if text.lower() in ("none", "0"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def number(text: str) -> float:
    """A float."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def parse_model_arg(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value) with value parsed as JSON when possible
    (``128`` -> 128, ``0.1`` -> 0.1, ``true`` -> True, ``none``/``null`` -> None), else a
    string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    lowered = raw.strip().lower()
    if lowered in ("none", "null"):
        return key, None
    if lowered in ("true", "false"):
        return key, lowered == "true"
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw
