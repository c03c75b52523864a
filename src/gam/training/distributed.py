"""Single- or multi-process execution: device choice, process group, and the few collectives
training needs.

``torchrun --nproc-per-node N -m gam train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
(and the rendezvous address); with ``WORLD_SIZE > 1`` a process group is created (``gloo`` on
CPU, ``nccl`` on GPU) and the model is wrapped in ``DistributedDataParallel``. Without torchrun
every collective below is a no-op, so the trainer code is the same in both cases.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gam.runtime import resolve_device

__all__ = ["DistContext", "init_distributed", "is_sharded", "unwrap_model"]


@dataclass
class DistContext:
    """Rank, world size and device of this process; collectives that degrade to no-ops when
    there is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over all processes (``ReduceOp.AVG`` is NCCL-only, so average by
        dividing the sum)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shutdown(self, clean: bool = True) -> None:
        """Destroy the process group; after a clean finish, first wait for every rank (a rank
        tearing gloo down while another still uses it can abort)."""
        if self.enabled and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Create the process group if launched by torchrun with more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # generous timeout: the other ranks wait while rank 0 trains the tokenizer
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(hours=2))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                       backend=backend)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Is ``model`` (under DDP / compile wrappers) sharded by FSDP2 (``fully_shard``)? Its every
    forward then gathers parameters collectively: all ranks must run the same forwards."""
    from torch.distributed.fsdp import FSDPModule  # imported when first needed: it loads DTensor

    return isinstance(unwrap_model(model), FSDPModule)
