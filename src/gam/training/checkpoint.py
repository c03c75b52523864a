"""Training checkpoints that a run killed at any moment can resume from, exactly.

Layout of ``RUN_DIR/checkpoint/``::

    latest.json                  {"dir": "step-00000120-ab12cd", "step": 120}
    step-00000120-ab12cd/
        model.safetensors        weights (gam.models.io.save_weights)
        optimizer.pt             optimizer, LR scheduler and (fp16) grad-scaler states
        rng.pt                   torch / CUDA / numpy / python RNG states of every rank
        state.json               data position and counters, and the run's settings as they
                                 were used (TrainingState)
        sharded/                 FSDP runs only: model + optimizer, sharded (gam.training.fsdp)

``latest.json``'s ``"dir"`` must be a plain folder name inside ``checkpoint/`` (a path
leading elsewhere, e.g. into another run, is refused); ``state.json`` is checked field by field
when read (:meth:`TrainingState.from_dict`).

A checkpoint is written into a temporary sibling folder, every file flushed to disk, then the
folder is renamed into place (atomic) and ``latest.json`` is replaced atomically
(temporary file + ``os.replace``); only then are older checkpoints deleted. A kill at any point
therefore leaves either the previous or the new checkpoint complete and pointed to. If
``latest.json`` is lost, the newest complete ``step-*`` folder is used.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gam.files import atomic_write_json, raise_naming_disk_error, remove_interrupted_writes
from gam.models.io import CheckpointError, load_weights, read_json_file, save_weights
from gam.training.rundir import CHECKPOINT_DIR

LATEST = "latest.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"


@dataclass
class TrainingState:
    """Where a run is: ``step`` optimizer steps done; the next batch is batch
    ``batch_in_epoch`` of epoch ``epoch`` (0-based). The epoch counters let a resumed run report
    the same epoch time and throughput."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_train_time: float = 0.0
    epoch_tokens: int = 0
    total_train_time: float = 0.0
    total_steps: int = 0
    batches_per_epoch: int = 0
    world_size: int = 1
    threads: int = 0  # torch CPU threads per process (kept by --resume: bit-exact floats)
    # the RunConfig dict the run trained with up to here (None in older checkpoints): --resume
    # refuses a config.json whose settings differ
    settings: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: Any, source: str | Path = STATE) -> TrainingState:
        """The state of a parsed ``state.json``; ValueError naming ``source``, the field and
        what it must be when a value has the wrong type or range."""
        if not isinstance(values, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in values.items() if k in known})
        state.validate(source)
        return state

    def validate(self, source: str | Path = STATE) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "settings":
                ok, expected = value is None or isinstance(value, dict), "an object or null"
            elif f.type == "float" or isinstance(f.default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value) and value >= 0
                expected = "a finite number >= 0"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
                expected = "an integer >= 0"
            if not ok:
                raise ValueError(f"{source}: {f.name} must be {expected}, got {value!r}")
        if self.batches_per_epoch and self.batch_in_epoch >= self.batches_per_epoch:
            raise ValueError(f"{source}: batch_in_epoch {self.batch_in_epoch} is not below "
                             f"batches_per_epoch {self.batches_per_epoch}")


# -------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (on CUDA, the current device's generator), in a
    form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's own GPU only: under torchrun every rank sees every GPU, and reading
        # (or, on resume, writing) the others' generators would touch devices it does not own
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # written by an older gam: every visible GPU's
            cuda = cuda[torch.cuda.current_device()] if len(cuda) > torch.cuda.current_device() \
                else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ----------------------------------------------------------------------------------- saving
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_save_synced(obj: Any, path: Path) -> None:
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:  # a full disk: say which file
        raise_naming_disk_error(exc, path)
        raise


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, scheduler: Any, state: TrainingState,
                    rng_states: list[dict[str, Any]], scaler: Any = None,
                    write_more: Callable[[Path], None] | None = None) -> Path:
    """Write a new checkpoint atomically and make it the latest; returns its folder.

    ``write_more(folder)`` writes further files into the (still temporary) folder, e.g. the
    sharded model and optimizer of an FSDP run (``optimizer`` None: they are there)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_interrupted_writes(root, (LATEST,))
    name = f"step-{state.step:08d}-{secrets.token_hex(3)}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    try:
        if write_more is not None:
            write_more(tmp)
        save_weights(model, tmp / WEIGHTS)
        _torch_save_synced({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "scaler": scaler.state_dict() if scaler is not None else None},
                           tmp / OPTIMIZER)
        _torch_save_synced({"ranks": rng_states}, tmp / RNG)
        atomic_write_json(tmp / STATE, asdict(state))
        _fsync_dir(tmp)
        final = root / name
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_json(root / LATEST, {"dir": name, "step": state.step})
    for old in root.iterdir():
        if old.name != name and old.is_dir() and (old.name.startswith("step-")
                                                  or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------- loading
@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainingState
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    rng_states: list[dict[str, Any]]

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def read_state(folder: Path) -> TrainingState:
    path = folder / STATE
    values = read_json_file(path, f"checkpoint file {path}")
    try:
        return TrainingState.from_dict(values, source=path)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {e}" if str(e).startswith(str(path))
                              else f"checkpoint file {path} is corrupted ({e})") from e


def _latest_folder(root: Path) -> Path | None:
    """The folder ``latest.json`` names (None when it is missing or unreadable: the newest
    complete folder is then used); CheckpointError when it names anything but a folder of
    ``root`` itself."""
    try:
        latest = json.loads((root / LATEST).read_text())
        name = latest["dir"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name \
            or "/" in name or "\\" in name:
        raise CheckpointError(
            f"{root / LATEST} names {name!r}; expected the name of a step-* folder inside "
            f"{root} (it may not lead out of the run's own checkpoint folder)")
    folder = root / name
    return folder if folder.is_dir() else None


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """Folder of the latest checkpoint of a run, or None if it has none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    folder = _latest_folder(root)
    if folder is not None:
        return folder
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")),
                        key=lambda p: p.name, reverse=True)
    for folder in candidates:
        try:
            read_state(folder)
            return folder
        except CheckpointError:
            continue
    return None


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupted ({e})") from e


def load_checkpoint(folder: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint folder (weights are loaded separately with ``load_into``)."""
    folder = Path(folder)
    state = read_state(folder)
    opt = _torch_load(folder / OPTIMIZER)
    rng = _torch_load(folder / RNG)
    if not isinstance(opt, dict) or "optimizer" not in opt:
        raise CheckpointError(f"checkpoint file {folder / OPTIMIZER} is corrupted")
    if not isinstance(rng, dict) or not isinstance(rng.get("ranks"), list):
        raise CheckpointError(f"checkpoint file {folder / RNG} is corrupted")
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint file {folder / WEIGHTS} does not exist")
    return LoadedCheckpoint(folder, state, opt["optimizer"], opt.get("scheduler"),
                            opt.get("scaler"), rng["ranks"])


def load_into(ckpt: LoadedCheckpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: Any = None, scaler: Any = None) -> None:
    """Load weights, optimizer, scheduler and scaler states of ``ckpt``."""
    load_weights(model, ckpt.weights)
    try:
        optimizer.load_state_dict(ckpt.optimizer)
        if scheduler is not None and ckpt.scheduler is not None:
            scheduler.load_state_dict(ckpt.scheduler)
        if scaler is not None and ckpt.scaler is not None:
            scaler.load_state_dict(ckpt.scaler)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {ckpt.path / OPTIMIZER} does not match the "
                              f"model or optimizer ({e})") from e
