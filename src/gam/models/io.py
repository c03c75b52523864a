"""Saving and loading model weights: safetensors plus a small JSON that rebuilds the model.

A model folder holds ``model.json`` (``{"model": name, "config": {...}}``) and
``model.safetensors``. Both are written atomically (temporary file, then ``os.replace``), so an
interrupted save leaves the previous files intact; a truncated or corrupted file is reported as
a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gam.files import (
    atomic_write_json,
    default_mode,
    mkstemp_default_mode,
    raise_naming_disk_error,
    remove_interrupted_writes,
)
from gam.models.lm import CausalLM
from gam.models.registry import MODELS, model_from_config, recorded_config

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"

# safetensors' save_file writes through a temporary sibling of its own, ".tmp" + 6 letters or
# digits (the Rust tempfile crate's names), which a kill mid-write leaves behind
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or does not match the model."""


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once, as the head (an untied embedding is kept)."""
    sd = model.state_dict()
    emb, head = sd.get("token_embedding.weight"), sd.get("head.weight")
    if emb is not None and head is not None and emb.data_ptr() == head.data_ptr():
        del sd["token_embedding.weight"]
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Atomically write the model's weights as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_default_mode(path)  # umask mode, not mkstemp's 0600
    os.close(fd)
    try:
        save_file(state_dict_for_saving(model), tmp)
        os.chmod(tmp, default_mode())  # safetensors writes its files 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        raise_naming_disk_error(exc, path)
        raise


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model``; CheckpointError if the file is missing,
    truncated, corrupted or holds other shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupted ({e})") from e
    if "head.weight" in sd:
        sd.setdefault("token_embedding.weight", sd["head.weight"])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint file {path} does not match the model: {e}") from e


def save_pretrained(model: CausalLM, out_dir: str | Path) -> Path:
    """Write ``model.json`` and ``model.safetensors`` into ``out_dir``."""
    out_dir = Path(out_dir)
    name = getattr(model, "model_name", None)
    if name not in MODELS:
        raise ValueError(f"model has no registered name (got {name!r}); build it with "
                         f"gam.build_model")
    save_weights(model, out_dir / MODEL_WEIGHTS)
    atomic_write_json(out_dir / MODEL_JSON, {"model": name, "config": model.config.to_dict()})
    return out_dir


def remove_interrupted_model_writes(folder: str | Path) -> list[Path]:
    """Delete what saves of ``model.json`` / ``model.safetensors`` (or of other weights)
    killed mid-way left in ``folder``; only where no other process is saving into it."""
    return remove_interrupted_writes(folder, (MODEL_JSON, MODEL_WEIGHTS),
                                     extra=(SAFETENSORS_TEMPORARY,))


def validate_model_json(meta: Any, path: Path) -> tuple[str, dict[str, Any]]:
    """``(model name, config dict)`` of a parsed ``model.json``; CheckpointError naming ``path``
    and what was expected when it is not ``{"model": str, "config": {...}}``."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupted: expected a JSON object "
                              f'{{"model": ..., "config": {{...}}}}, got {type(meta).__name__}')
    for key, kind in (("model", str), ("config", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path} is corrupted: {key!r} must be a JSON "
                                  f"{'string' if kind is str else 'object'}, got "
                                  f"{meta.get(key)!r}"[:300])
    return meta["model"], meta["config"]


def read_json_file(path: Path, label: str, missing: str = "") -> Any:
    """The parsed JSON of ``path``; a CheckpointError naming it (``label``, e.g. ``checkpoint
    file PATH``) when it does not exist (``missing`` adds what that means) or is not JSON."""
    if not path.is_file():
        raise CheckpointError(f"{label} does not exist{missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{label} is truncated or corrupted ({e})") from e


def load_model_config(model_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """``(model name, config dict)`` of ``MODEL_DIR/model.json``."""
    path = Path(model_dir) / MODEL_JSON
    meta = read_json_file(path, str(path), f": {model_dir} holds no saved model")
    return validate_model_json(meta, path)


def load_pretrained(model_dir: str | Path, map_location: str | torch.device = "cpu",
                    weights: str | Path | None = None) -> CausalLM:
    """Rebuild a model saved with ``save_pretrained`` (or from a run directory)."""
    name, cfg = load_model_config(model_dir)
    if name not in MODELS:
        raise CheckpointError(f"{Path(model_dir) / MODEL_JSON} names unknown model {name!r}")
    try:
        config = recorded_config(name, cfg)  # a field it lacks: the name's variant, else legacy
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(model_dir) / MODEL_JSON} holds an invalid {name!r} config "
                              f"({e})") from e
    model = model_from_config(name, config)
    load_weights(model, weights if weights is not None else Path(model_dir) / MODEL_WEIGHTS)
    return model.to(map_location)

