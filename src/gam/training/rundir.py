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
``gam export``) reads it back through :func:`read_run_config` (which checks the types of what
it reads, :func:`validate_run_config`) and the accessors below.

``config.json`` also records what the run's other files must be: the tokenizer file's SHA-256
(``tokenizer.sha256``, with the vocabulary size and the token count of each split it produced),
the model family and config (``model``, ``model_config``) and the fingerprint and file of each
data split. :func:`check_run_files` and :func:`check_recorded_split` refuse files that differ
(another run's tokenizer or model copied in, other data found where the run's was). Runs made
before tokenizer hashes were recorded are checked by vocabulary size and token counts only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from gam.files import (
    LockHeldError,
    atomic_write_json,
    hold_lock,
    remove_interrupted_writes,
    sha256_file,
)
from gam.models.io import (
    MODEL_JSON,
    CheckpointError,
    load_model_config,
    remove_interrupted_model_writes,
)
from gam.training.config import RunConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
LOCK_FILE = ".lock"

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "LOCK_FILE", "METRICS_FILE", "RunBusyError",
           "TOKENIZER_FILE", "dataset_slug", "holds_run", "is_run_dir", "now", "read_run_config",
           "read_run_config_if_any", "recorded_data", "recorded_fingerprints", "recorded_schedule",
           "recorded_vocab_size", "run_record", "safe_filename", "training_lock", "default_run_dir",
           "discard_unstarted_run", "refuse_a_started_run", "write_run_config",
           "validate_run_config", "run_settings", "check_run_files", "check_tokenizer_file",
           "check_recorded_split", "remove_interrupted_run_writes"]


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
    validate_run_config(config, path)
    return config


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# (section, key) -> (what it must be, test); None as section: the top level
_FIELD_TYPES: dict[tuple[str | None, str], tuple[str, Any]] = {
    (None, "model"): ("a string", lambda v: isinstance(v, str)),
    (None, "model_preset"): ("a string", lambda v: isinstance(v, str)),
    (None, "preset"): ("a string", lambda v: isinstance(v, str)),  # its name before model_preset
    (None, "model_arg"): ("an object", lambda v: isinstance(v, dict)),
    (None, "model_overrides"): ("an object", lambda v: isinstance(v, dict)),  # before model_arg
    (None, "data"): ("an object", lambda v: isinstance(v, dict)),
    (None, "tokenizer"): ("an object", lambda v: isinstance(v, dict)),
    (None, "train"): ("an object", lambda v: isinstance(v, dict)),
    (None, "model_config"): ("an object", lambda v: isinstance(v, dict)),
    (None, "schedule"): ("an object", lambda v: isinstance(v, dict)),
    ("data", "data_dir"): ("a string or null", lambda v: v is None or isinstance(v, str)),
    ("data", "use_hub"): ("true or false", lambda v: isinstance(v, bool)),
    ("data", "fingerprints"): ("an object of strings", lambda v: isinstance(v, dict) and all(
        isinstance(x, str) for x in v.values())),
    ("data", "files"): ("an object of strings", lambda v: isinstance(v, dict) and all(
        isinstance(x, str) for x in v.values())),
    ("data", "tokens"): ("an object of token counts", lambda v: isinstance(v, dict) and all(
        _is_count(x) for x in v.values())),
    ("tokenizer", "actual_vocab_size"): ("a positive integer", lambda v: _is_count(v, 1)),
    ("tokenizer", "sha256"): ("a SHA-256 in hex", lambda v: isinstance(v, str) and len(v) == 64),
    ("tokenizer", "on_all_splits"): ("true or false", lambda v: isinstance(v, bool)),
    ("schedule", "total_steps"): ("a positive integer", lambda v: _is_count(v, 1)),
    ("schedule", "batches_per_epoch"): ("a positive integer", lambda v: _is_count(v, 1)),
}


def validate_run_config(config: Any, path: Path) -> None:
    """CheckpointError naming ``path``, the field and what it must be, when a parsed
    ``config.json`` has a section or a recorded value of the wrong type (the settings' own
    values are checked when they are read, :func:`run_settings`)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"run config {path} is corrupted (not a JSON object)")
    for (section, key), (expected, ok) in _FIELD_TYPES.items():
        holder = config if section is None else config.get(section)
        if isinstance(holder, dict) and key in holder and not ok(holder[key]):
            name = key if section is None else f"{section}.{key}"
            raise CheckpointError(f"run config {path}: {name} must be {expected}, got "
                                  f"{holder[key]!r}"[:400])


def run_settings(config: dict[str, Any], run_dir: str | os.PathLike[str]) -> RunConfig:
    """The ``RunConfig`` a run's ``config.json`` records; ValueError naming the file and the
    setting when one is missing or invalid."""
    try:
        return RunConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"run config {Path(run_dir) / CONFIG_FILE}: {e}") from e


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
    if not isinstance(config, dict):
        return {}
    if "model_config" in config:  # a training run's record (not, e.g., a transformers config)
        validate_run_config(config, path)
    return config


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


def recorded_tokenizer_sha256(config: dict[str, Any]) -> str | None:
    """SHA-256 of the run's ``tokenizer.json`` bytes (None for runs made before it was kept)."""
    return config.get("tokenizer", {}).get("sha256")


def recorded_files(config: dict[str, Any]) -> dict[str, str]:
    """The data file of each split the run was made with (``{}`` if not recorded)."""
    return config.get("data", {}).get("files", {})


# --------------------------------------------------------------------------------- checks
def check_tokenizer_file(run_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """CheckpointError if ``RUN_DIR/tokenizer.json`` is not the file the run recorded (its
    SHA-256 differs); runs that recorded no hash pass."""
    recorded = recorded_tokenizer_sha256(config)
    path = Path(run_dir) / TOKENIZER_FILE
    if recorded is None or not path.is_file():
        return  # no hash kept (an older run), or missing: the loader names the missing file
    actual = sha256_file(path)
    if actual != recorded:
        raise CheckpointError(
            f"tokenizer {path} is not this run's tokenizer: its sha256 is {actual[:16]}..., "
            f"{Path(run_dir) / CONFIG_FILE} recorded {recorded[:16]}... (another run's "
            f"tokenizer copied in?); restore the run's own tokenizer.json")


def check_saved_model(run_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """CheckpointError if ``RUN_DIR/model.json`` names another model family or config than
    ``config.json`` records (another run's model copied in)."""
    run_dir = Path(run_dir)
    name, model_config = load_model_config(run_dir)
    where = f"{run_dir / MODEL_JSON}"
    if "model" in config and name != config["model"]:
        raise CheckpointError(
            f"{where} holds a {name!r} model but {run_dir / CONFIG_FILE} records a "
            f"{config['model']!r} run (another run's model copied in?)")
    recorded = config.get("model_config")
    if recorded is not None:
        saved = model_config
        differ = sorted(k for k in set(saved) | set(recorded) if saved.get(k) != recorded.get(k))
        if differ:
            shown = ", ".join(f"{k} {saved.get(k)!r} != {recorded.get(k)!r}" for k in differ[:4])
            raise CheckpointError(
                f"{where} does not hold the model {run_dir / CONFIG_FILE} records ({shown}; "
                f"another run's model copied in?)")


def check_run_files(run_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """The run's saved model and tokenizer are those its ``config.json`` records
    (:func:`check_saved_model`, :func:`check_tokenizer_file`); CheckpointError otherwise."""
    check_saved_model(run_dir, config)
    check_tokenizer_file(run_dir, config)


def check_recorded_split(run_dir: str | os.PathLike[str], config: dict[str, Any], split: str,
                         fingerprint: str, file: str | None,
                         tokens: int | None = None) -> None:
    """ValueError naming both files if the ``split`` just read (its ``fingerprint``, from
    ``file``) is not the text the run recorded, or CheckpointError naming the tokenizer if it
    gave another number of ``tokens``; a split the run did not record passes."""
    recorded = recorded_fingerprints(config).get(split)
    was = recorded_files(config).get(split)
    if recorded is not None and recorded != fingerprint:
        then = was or recorded_data(config).get("corpus_source", "its data")
        raise ValueError(
            f"the {split} split read from {file or 'the data'} differs from the one run "
            f"{run_dir} was made with, read from {then} (sha256 of its text {fingerprint[:16]}"
            f"..., recorded {recorded[:16]}...); point --data-dir at the run's data or remove "
            f"the other file")
    counted = recorded_data(config).get("tokens", {}).get(split)
    if recorded is not None and tokens is not None and counted is not None \
            and counted != tokens:
        raise CheckpointError(
            f"tokenizer {Path(run_dir) / TOKENIZER_FILE} encodes the {split} split to {tokens:,}"
            f" tokens, the run recorded {counted:,}: it is not the tokenizer the run was made "
            f"with; restore the run's own tokenizer.json")


def remove_interrupted_run_writes(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that saves killed mid-way left in the run folder (only while
    holding its :func:`training_lock`)."""
    run_dir = Path(run_dir)
    return remove_interrupted_model_writes(run_dir) + remove_interrupted_writes(
        run_dir, (CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE))


def default_run_dir(model: str, dataset: str, root: str | Path = "runs") -> Path:
    """``runs/<model>-<dataset>-<timestamp>`` (``text:PATH`` becomes ``text-<file stem>``)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{safe_filename(f'{model}-{dataset_slug(dataset)}')}-{stamp}"


def refuse_a_started_run(run_dir: Path) -> None:
    """A new run never writes into a folder that holds one (a ValueError saying what to do)."""
    if holds_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                         f"or choose another --out")


def discard_unstarted_run(run_dir: Path, written: list[str], new_folder: bool) -> None:
    """A new run that failed before its first step (too little memory, a full disk...) holds
    nothing worth keeping: remove the run files it ``written``, and the folder if the run made
    it (``new_folder``) and nothing else is in it, so that a retry with other settings into the
    same folder is not refused as "already holds a run"."""
    for name in written:
        (run_dir / name).unlink(missing_ok=True)
    if new_folder:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: something else is in it
            run_dir.rmdir()
