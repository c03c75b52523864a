"""The run directory's format: its file names and its ``config.json``, written and read here only.

Layout of ``RUN_DIR`` (``gam train --out RUN_DIR``)::

    config.json        model name, preset, resolved model config, data, tokenizer, train recipe,
                       derived schedule (total steps...), gam / torch versions
    metrics.jsonl      one JSON record per logged step / evaluation (see gam.training.metrics)
    model.json         gam.models.io.save_pretrained: latest weights, so that
    model.safetensors  gam.load_pretrained(RUN_DIR) rebuilds the model
    tokenizer.json     the run's tokenizer (tokenizers library JSON)
    checkpoint/        resumable state (see gam.training.checkpoint)
    .lock              held (flock) by the process training into RUN_DIR, see training_lock

The trainer writes ``config.json`` through :func:`write_run_config` (its content made by
:func:`run_record`); everything else (``gam eval`` / ``generate``, ``--resume``, the benchmarks,
``gam export``) reads it back through :func:`read_run_config` and the accessors below.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from gam.files import LockHeldError, atomic_write_json, hold_lock
from gam.models.io import MODEL_JSON, MODEL_WEIGHTS, CheckpointError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
LOCK_FILE = ".lock"

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "LOCK_FILE", "METRICS_FILE", "MODEL_JSON",
           "MODEL_WEIGHTS", "RunBusyError", "TOKENIZER_FILE", "dataset_slug", "holds_run",
           "is_run_dir", "now", "read_run_config", "read_run_config_if_any", "recorded_data",
           "recorded_fingerprints", "recorded_schedule", "recorded_vocab_size", "run_record",
           "safe_filename", "training_lock", "write_run_config"]


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Does ``path`` hold a run's ``config.json``?"""
    return (Path(path) / CONFIG_FILE).is_file()


def holds_run(path: str | os.PathLike[str]) -> bool:
    """Has a run been started in ``path`` (a ``config.json`` or a ``checkpoint/``)?"""
    return (Path(path) / CONFIG_FILE).exists() or (Path(path) / CHECKPOINT_DIR).exists()


class RunBusyError(OSError):
    """Another process is training into this run directory."""


@contextmanager
def training_lock(run_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` (:func:`gam.files.hold_lock`) while training into ``run_dir``
    (created if needed).

    A second process that would train into the same folder (a second ``--resume``, or two
    benchmark processes given the same run) gets :class:`RunBusyError` at once, instead of
    both writing the same checkpoints and metrics.
    """
    run_dir = Path(run_dir)
    with ExitStack() as stack:
        try:
            stack.enter_context(hold_lock(run_dir / LOCK_FILE))
        except LockHeldError as exc:
            raise RunBusyError(f"{run_dir} is being trained by another process (pid "
                               f"{exc.holder}); wait for it to finish or choose another "
                               f"folder") from None
        yield


def _parse(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"run config {path} is truncated or corrupted ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"run config {path} is corrupted (not a JSON object)")
    return config


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a run; ValueError if ``run_dir`` holds no run, CheckpointError
    if the file is corrupted."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        extra = " (it has a checkpoint/ but no config.json)" if (
            run_dir / CHECKPOINT_DIR).is_dir() else ""
        raise ValueError(f"{run_dir} holds no training run: {CONFIG_FILE} is missing{extra}")
    return _parse(path)


def read_run_config_if_any(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a model folder that may not be a training run: ``{}`` when it is
    missing or not an object; ValueError when it is not valid JSON."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    return config if isinstance(config, dict) else {}


def write_run_config(run_dir: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write ``config.json`` atomically."""
    atomic_write_json(Path(run_dir) / CONFIG_FILE, record)


def run_record(run: dict[str, Any], model_config: dict[str, Any],
               tokenizer: dict[str, Any], data: dict[str, Any], schedule: dict[str, Any],
               versions: dict[str, str], created: str | None) -> dict[str, Any]:
    """The content of ``config.json``: the ``RunConfig`` dict ``run``, the resolved model config,
    what the tokenizer and data turned out to be (merged over the run's own settings), the
    derived schedule, library versions and the creation time (a resumed run keeps its own;
    :func:`now` for a new one)."""
    return {
        **run,
        "model_config": model_config,
        "tokenizer": {**run["tokenizer"], **tokenizer, "file": TOKENIZER_FILE},
        "data": {**run["data"], **data},
        "schedule": schedule,
        **versions,
        "created": created,
    }


def now() -> str:
    """The creation time recorded in ``config.json``."""
    return _dt.datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- names
def safe_filename(text: str) -> str:
    """``text`` with every character but letters, digits and ``-_.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def dataset_slug(dataset: str) -> str:
    """A dataset as a folder name: ``text:PATH`` -> ``text-<file stem>``, others made safe."""
    if dataset.startswith("text:"):
        dataset = "text-" + (Path(dataset[5:]).stem or "corpus")
    return safe_filename(dataset)


# ------------------------------------------------------------------------------ accessors
def recorded_schedule(config: dict[str, Any]) -> dict[str, Any]:
    """``total_steps``, ``batches_per_epoch``, ``seq_len``, ``tokens_per_step``, ... (``{}``)."""
    return config.get("schedule", {})


def recorded_data(config: dict[str, Any]) -> dict[str, Any]:
    """The data section: the run's DataConfig plus ``seq_len``, ``corpus_source``,
    ``fingerprints`` and ``tokens`` per split (``{}``)."""
    return config.get("data", {})


def recorded_fingerprints(config: dict[str, Any]) -> dict[str, str]:
    """Fingerprint of each data split the run was trained on (``{}`` if not recorded)."""
    return config.get("data", {}).get("fingerprints", {})


def recorded_vocab_size(config: dict[str, Any]) -> int | None:
    """Number of tokens of the run's tokenizer, as it turned out."""
    return config.get("tokenizer", {}).get("actual_vocab_size")
