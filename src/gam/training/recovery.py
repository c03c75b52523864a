"""What ``--resume`` checks and repairs before a run continues: a checkpoint that has gone
missing (refused), settings in ``config.json`` that differ from those the checkpoint was
trained with (refused, naming them), and the run's saved model files (rewritten from the
checkpoint when they are missing, unreadable, stale or another model's)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gam.files import as_json, atomic_write_bytes
from gam.models.io import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    CheckpointError,
    load_model_config,
    save_pretrained,
    state_dict_for_saving,
)
from gam.training.checkpoint import LATEST, STATE, TrainingState, find_checkpoint, read_state
from gam.training.config import RunConfig, TrainConfig, current_names
from gam.training.metrics import read_metrics, truncate_metrics
from gam.training.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    TOKENIZER_FILE,
    recorded_schedule,
    remove_interrupted_run_writes,
    write_run_config,
)

# What --resume may change (the run's length, --max-steps / --epochs) and where the data
# lives now (--data-dir; its content is checked by fingerprint): not compared.
RESUMABLE_CHANGES = (("train", "epochs"), ("train", "max_steps"), ("data", "data_dir"))

logger = logging.getLogger("gam.training")


def load_checkpoint_step(folder: Path) -> int:
    """Step of a checkpoint folder (-1 if its state file is unreadable)."""
    try:
        return read_state(folder).step
    except CheckpointError:
        return -1


def _first_checkpoint_step(config: dict[str, Any]) -> int | None:
    """The step of a run's first checkpoint (``--save-every``, the first epoch's end or the
    last step, whichever comes first), from its ``config.json``; None if not recorded."""
    schedule = recorded_schedule(config)
    bounds = [schedule.get("batches_per_epoch"), schedule.get("total_steps"),
              config.get("train", {}).get("save_every")]
    bounds = [b for b in bounds if isinstance(b, int) and b > 0]
    return min(bounds) if bounds else None


def refuse_lost_checkpoint(run_dir: Path, config: dict[str, Any]) -> None:
    """CheckpointError if the run saved a checkpoint that is gone.

    Resuming from step 0 is right for a run that died before its first checkpoint, but after
    one it would silently retrain and cut ``metrics.jsonl`` back to nothing. A checkpoint was
    saved if ``checkpoint/latest.json``, the run's ``model.safetensors`` or ``model.json``
    exist (all are written only with a checkpoint), or if ``metrics.jsonl`` records a step
    beyond the first checkpoint's (a run goes past it only once it is saved).
    """
    latest = run_dir / CHECKPOINT_DIR / LATEST
    recorded = [r.get("step", 0) for r in read_metrics(run_dir / METRICS_FILE)]
    recorded = [s for s in recorded if isinstance(s, int)]
    first = _first_checkpoint_step(config)
    saved = any(p.exists() for p in (latest, run_dir / MODEL_WEIGHTS, run_dir / MODEL_JSON)) \
        or (first is not None and any(s > first for s in recorded))
    if not saved:
        return
    done = f" (metrics.jsonl records steps up to {max(recorded)})" if recorded else ""
    raise CheckpointError(
        f"cannot resume {run_dir}: it saved a checkpoint{done} but "
        f"{run_dir / CHECKPOINT_DIR} holds no complete step-* folder; nothing was changed. "
        f"Restore the checkpoint folder, or train a new run with another --out")


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 3e-4, ...}`` of a RunConfig dict, JSON-normalised (tuples as lists)."""
    flat = {}
    for key, value in as_json(settings).items():
        if isinstance(value, dict) and key in ("data", "tokenizer", "train"):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def refuse_changed_settings(run_dir: Path, checkpoint_dir: Path, run: RunConfig) -> None:
    """ValueError naming the fields if the settings of ``config.json`` (``run``) differ from
    those the checkpoint was trained with, except the run's length and the data folder
    (:data:`RESUMABLE_CHANGES`). A run's settings are fixed at its creation: a hand-edited
    ``config.json`` would otherwise be recorded as if used (lr) or break the run (seed: the
    data order changes mid-epoch). Checkpoints that recorded no settings pass."""
    used = read_state(checkpoint_dir).settings
    if used is None:
        return
    skip = {f"{section}.{key}" for section, key in RESUMABLE_CHANGES}
    before, now = _flat(current_names(used)), _flat(run.to_dict())
    differ = sorted(k for k in set(before) | set(now)
                    if k not in skip and before.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} {now.get(k)!r} (trained with {before.get(k)!r})"
                          for k in differ[:6])
        raise ValueError(
            f"{run_dir / CONFIG_FILE} differs from the settings the run was trained with "
            f"({checkpoint_dir / STATE}): {shown}; a run's settings are fixed when it is made "
            f"(only --max-steps / --epochs may change with --resume): undo the edit, or train a "
            f"new run with another --out")


def repair_saved_model(run_dir: Path, model: torch.nn.Module, step: int) -> None:
    """Rewrite ``RUN_DIR/model.json`` + ``model.safetensors`` from the checkpoint's weights (in
    ``model``) if they are missing, unreadable or stale, so that eval / generate / export work.
    """
    weights = run_dir / MODEL_WEIGHTS
    expected = state_dict_for_saving(model)
    why = None
    try:
        name, config = load_model_config(run_dir)
        saved = load_file(str(weights)) if weights.is_file() else None
        if name != getattr(model, "model_name", name) \
                or as_json(config) != as_json(model.config.to_dict()):
            why = f"another model's ({MODEL_JSON} describes a {name!r} model of another config)"
    except (CheckpointError, SafetensorError, OSError, ValueError) as e:
        why, saved = f"unreadable: {_one_line(e)}", None
    if why is None:
        if saved is None:
            why = "missing"
        elif saved.keys() != expected.keys() or not all(
                torch.equal(saved[k], v) for k, v in expected.items()):
            why = "not the checkpoint's weights"
    if why is None:
        return
    save_pretrained(model, run_dir)
    logger.warning("repaired %s and %s from the checkpoint of step %d (they were %s)",
                   weights, run_dir / MODEL_JSON, step, why)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def write_run_files(run_dir: Path, record: dict[str, Any], tokenizer_bytes: bytes | None,
                    step: int, model: torch.nn.Module | None, created: list[str]) -> None:
    """The run folder as a (resumed) run starts: ``config.json`` (``record``), the tokenizer
    (when ``tokenizer_bytes`` is given), ``metrics.jsonl`` cut back to ``step``, and the model
    files repaired from the checkpoint's weights (``model``, when resuming from one).
    ``created`` receives the run files this call creates (none it finds there) before any is
    written, so that a run failing midway can remove them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_interrupted_run_writes(run_dir)
    created += [name for name in (CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE)
                if not (run_dir / name).exists()]
    write_run_config(run_dir, record)
    if tokenizer_bytes is not None:  # config.json records its sha256
        atomic_write_bytes(run_dir / TOKENIZER_FILE, tokenizer_bytes)
    truncate_metrics(run_dir / METRICS_FILE, step)
    if model is not None:
        repair_saved_model(run_dir, model, step)


def check_resumable(run_dir: Path, checkpoint_dir: Path, state: TrainingState,
                    batches_per_epoch: int, total_steps: int, train: TrainConfig) -> None:
    """CheckpointError if the checkpoint's epoch length is not the data's now; ValueError if
    the run is already beyond the ``total_steps`` asked for."""
    if state.batches_per_epoch != batches_per_epoch:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} was made with {state.batches_per_epoch} "
            f"batches per epoch, the data now gives {batches_per_epoch} (the data or "
            f"the tokenizer {run_dir / TOKENIZER_FILE} changed, or its state.json "
            f"was edited)")
    if total_steps < state.step:
        raise ValueError(
            f"{run_dir} is already at step {state.step}, beyond the {total_steps} "
            f"steps of --epochs {train.epochs} / --max-steps {train.max_steps}; give a "
            f"larger --max-steps or --epochs with --resume")


def kept_checkpoint(run_dir: Path) -> str:
    """What a run that stopped (diverged) keeps: its last good checkpoint, if any."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return "No checkpoint had been saved yet (see --save-every)"
    return f"The last good checkpoint (step {load_checkpoint_step(ckpt)}) is kept in {ckpt.parent}"
