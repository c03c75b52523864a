"""What ``--resume`` checks and repairs before a run continues: a checkpoint that has gone
missing (refused), and the run's saved model files (rewritten from the checkpoint when they are
missing, unreadable or stale)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gam.models.io import CheckpointError, load_model_config, save_pretrained, state_dict_for_saving
from gam.training.checkpoint import LATEST, read_state
from gam.training.metrics import read_metrics
from gam.training.rundir import CHECKPOINT_DIR, METRICS_FILE, MODEL_JSON, MODEL_WEIGHTS

logger = logging.getLogger("gam.training")


def load_checkpoint_step(folder: Path) -> int:
    """Step of a checkpoint folder (-1 if its state file is unreadable)."""
    try:
        return read_state(folder).step
    except CheckpointError:
        return -1


def refuse_lost_checkpoint(run_dir: Path) -> None:
    """CheckpointError if the run saved a checkpoint that is gone.

    Resuming from step 0 is right for a run that died before its first checkpoint, but after
    one it would silently retrain and cut ``metrics.jsonl`` back to nothing. A checkpoint was
    saved if ``checkpoint/latest.json`` or the run's ``model.safetensors`` exist (both are
    written only with a checkpoint).
    """
    latest = run_dir / CHECKPOINT_DIR / LATEST
    weights = run_dir / MODEL_WEIGHTS
    if not latest.exists() and not weights.exists():
        return
    recorded = [int(r.get("step", 0)) for r in read_metrics(run_dir / METRICS_FILE)]
    done = f" (metrics.jsonl records steps up to {max(recorded)})" if recorded else ""
    raise CheckpointError(
        f"cannot resume {run_dir}: it saved a checkpoint{done} but "
        f"{run_dir / CHECKPOINT_DIR} holds no complete step-* folder; nothing was changed. "
        f"Restore the checkpoint folder, or train a new run with another --out")


def repair_saved_model(run_dir: Path, model: torch.nn.Module, step: int) -> None:
    """Rewrite ``RUN_DIR/model.json`` + ``model.safetensors`` from the checkpoint's weights (in
    ``model``) if they are missing, unreadable or stale, so that eval / generate / export work.
    """
    weights = run_dir / MODEL_WEIGHTS
    expected = state_dict_for_saving(model)
    why = None
    try:
        load_model_config(run_dir)
        saved = load_file(str(weights)) if weights.is_file() else None
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
