"""Command-line value types shared by ``gam train``, ``gam eval`` / ``generate`` and the
benchmarks (argparse ``type=`` functions: they raise ``argparse.ArgumentTypeError``)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, "an integer >= 0")


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
