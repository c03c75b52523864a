"""FSDP2 training (``--strategy fsdp``): the model sharded over the processes, and its sharded
checkpoints.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to each block, then to the whole
model (which then holds the embeddings, the final norm and the head as one more group): every
rank keeps 1/N of each parameter, of its gradient and of its AdamW moments, and gathers a
block's parameters only while that block runs. The optimizer must be built after sharding,
on the sharded parameters.

A checkpoint of an FSDP run is the usual folder of :mod:`gam.training.checkpoint` (written the
same way: temporary folder, rename, ``latest.json``) with the model and optimizer saved by
``torch.distributed.checkpoint`` (DCP) in ``sharded/``, each rank writing its own shards::

    step-00000120-ab12cd/
        sharded/             .metadata, __0_0.distcp, __1_0.distcp, ...: model + AdamW state
        model.safetensors    the whole model, gathered on rank 0 (for eval / export / repair)
        optimizer.pt         LR scheduler state only ("optimizer": null)
        rng.pt, state.json   as for any run

DCP reshards on load, so such a run may be resumed with another number of processes (also 1:
the model is then not sharded, but the checkpoints keep this format).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from gam.models.io import CheckpointError, save_pretrained
from gam.models.registry import model_from_config
from gam.training.checkpoint import (
    LoadedCheckpoint,
    TrainingState,
    _fsync_dir,
    save_checkpoint,
)
from gam.training.distributed import DistContext, is_sharded

SHARDED = "sharded"

logger = logging.getLogger("gam.training")

__all__ = ["SHARDED", "full_model", "load_sharded_into", "save_sharded_checkpoint",
           "shard_model"]


def shard_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Shard ``model`` in place over the ``ctx.world_size`` processes (a no-op for one process)
    and return it. ``model.blocks`` are sharded one by one, then the model itself."""
    if not ctx.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # evaluation and the gate statistics call hidden_states, not forward: it must gather the
    # model's own parameters (embeddings, final norm) the same way
    register_fsdp_forward_method(model, "hidden_states")
    return model


def full_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module | None:
    """The whole model as an ordinary module on rank 0 (``None`` on the others): a sharded one
    is gathered (collective: every rank calls this) into a new unsharded copy; an unsharded one
    is returned as it is."""
    if not is_sharded(model):
        return model if ctx.is_main else None
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws an init: keep the training stream
        copy = model_from_config(model.model_name, model.config)
    copy.load_state_dict(full)
    return copy


def save_sharded_checkpoint(run_dir: Path, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler: Any,
                            state: TrainingState, rng_states: list[dict[str, Any]],
                            ctx: DistContext) -> None:
    """Save a checkpoint of an FSDP run (collective) and, on rank 0, the run's whole
    ``model.safetensors`` + ``model.json``."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    whole = full_model(model, ctx)

    def write_shards(folder: Path) -> None:
        shards = folder / SHARDED
        _in_all_processes(dcp.save, {"model": model_state, "optimizer": optimizer_state},
                          shards)
        _fsync_dir(shards)

    if ctx.is_main:
        def share_folder_and_write(folder: Path) -> None:
            ctx.broadcast_object(str(folder))
            write_shards(folder)

        save_checkpoint(run_dir, whole, None, scheduler, state, rng_states,
                        write_more=share_folder_and_write)
        save_pretrained(whole, run_dir)
    else:
        write_shards(Path(ctx.broadcast_object(None)))
    ctx.barrier()


def load_sharded_into(ckpt: LoadedCheckpoint, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
    """Load the sharded model and optimizer of an FSDP run's checkpoint (collective) and its
    scheduler state. The optimizer's groups become the checkpoint's (see
    ``_keep_recorded_groups``)."""
    shards = ckpt.path / SHARDED
    if not (shards / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt.path} has no sharded model and optimizer "
                              f"({shards / '.metadata'} does not exist)")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    ours = [list(group["params"]) for group in optimizer_state["param_groups"]]
    try:
        _in_all_processes(dcp.load, {"model": model_state, "optimizer": optimizer_state},
                          shards)
        _keep_recorded_groups(optimizer, ours, optimizer_state["param_groups"], shards)
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state)
        if scheduler is not None and ckpt.scheduler is not None:
            scheduler.load_state_dict(ckpt.scheduler)
    except (CheckpointException, KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {shards} is corrupted or does not match the model "
                              f"or optimizer ({_first_line(e)})") from e


def _keep_recorded_groups(optimizer: torch.optim.Optimizer, ours: list[list[str]],
                          recorded: list[dict[str, Any]], shards: Path) -> None:
    """Give ``optimizer`` (whose groups hold the parameters named ``ours``) the checkpoint's
    grouping ``recorded`` of the same parameters, when they differ: a resumed run keeps the
    weight decay it was trained with. (An FSDP run recorded before the families' flags were
    read by name decayed its flagged matrices, e.g. Mamba's A_log.) ``set_state_dict`` would
    instead build groups without hyperparameters; other groups than ours are a ValueError."""
    theirs = [list(group["params"]) for group in recorded]
    if theirs == ours:
        return
    if len(theirs) != len(ours) or sorted(sum(theirs, [])) != sorted(sum(ours, [])):
        raise ValueError(f"parameters per optimizer group: {[len(names) for names in theirs]} "
                         f"read, {[len(names) for names in ours]} expected")
    by_name = {name: param for names, group in zip(ours, optimizer.param_groups, strict=True)
               for name, param in zip(names, group["params"], strict=True)}
    moved = [name for names, mine in zip(theirs, map(set, ours), strict=True)
             for name in names if name not in mine]
    for names, group in zip(theirs, optimizer.param_groups, strict=True):
        group["params"] = [by_name[name] for name in names]
    if moved:  # not only another order within the same groups
        logger.warning("checkpoint %s puts %d parameter(s) (%s, ...) in other optimizer groups "
                       "than this version would: resuming with the run's own groups", shards,
                       len(moved), moved[0])


def _in_all_processes(save_or_load: Callable[..., Any], state: dict[str, Any],
                      folder: Path) -> None:
    """``dcp.save`` / ``dcp.load`` of ``state`` in ``folder``, by every process (one process
    without a process group: DCP then warns at every call that it assumes so, which it may)."""
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        save_or_load(state, checkpoint_id=folder, no_dist=single)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
