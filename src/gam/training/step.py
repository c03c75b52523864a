"""One optimizer step of training, the only place it is written.

``train_step(model, optimizer, x, y, ...)``: forward under autocast (``dtype``) with the chunked
loss (``return_logits=False``: the B*T x vocab logits never exist at once), backward over
``grad_accum`` micro-batches, or over the given list of micro-batches, which may differ in
shape (DDP gradient sync only on the last one), gradient clipping (the
norm is returned even when clipping is off), the optimizer step (through the fp16 grad scaler
when one is given), the scheduler step and ``zero_grad(set_to_none=True)``.

``gam train`` (``Trainer``), ``gam bench throughput`` and ``python -m gam.bench.profile_step``
call it; a plain model, optimizer and batch are enough::

    loss, grad_norm = train_step(model, optimizer, x, y, grad_clip=1.0, dtype="bf16")

A NaN/inf loss, or without a scaler a NaN/inf gradient norm, raises :class:`NonFiniteError`
before the optimizer step, so the weights stay those of the last good step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from gam.runtime import autocast_context
from gam.training.distributed import DistContext, unwrap_model


class NonFiniteError(ArithmeticError):
    """The loss or the gradient norm is NaN or infinite; the optimizer step was not taken."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"{what} is {value}")
        self.what = what
        self.value = value


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor | Sequence[torch.Tensor],
               *, scheduler: Any = None, dtype: str = "fp32",
               grad_accum: int = 1, grad_clip: float = 0.0,
               scaler: torch.amp.GradScaler | None = None, ctx: DistContext | None = None
               ) -> tuple[float, float]:
    """Run one optimizer step on the batch ``(x, y)``; return ``(loss, grad_norm)``.

    ``model`` is what runs the forward pass (it may be a ``torch.compile`` or DDP wrapper; the
    gradients are clipped on the parameters of the plain model underneath). ``x`` and ``y``
    are moved to the model's device. ``x`` and ``y`` may instead be equal-length lists of
    micro-batches (``grad_accum`` then 1), e.g. sequences of different lengths: each counts as
    one micro-batch. ``loss`` is the mean over the micro-batches (and, with ``ctx``, over the
    processes); ``grad_clip`` 0 disables clipping.
    """
    params_model = unwrap_model(model)
    device = next(params_model.parameters()).device
    distributed = ctx is not None and ctx.enabled
    if isinstance(x, torch.Tensor):
        xs = x.to(device, non_blocking=True).chunk(grad_accum)
        ys = y.to(device, non_blocking=True).chunk(grad_accum)
    else:
        if grad_accum != 1 or len(x) != len(y) or not x:
            raise ValueError(f"micro-batch lists need grad_accum 1 and as many targets as "
                             f"inputs, got grad_accum {grad_accum}, {len(x)} inputs and "
                             f"{len(y)} targets")
        xs = [t.to(device, non_blocking=True) for t in x]
        ys = [t.to(device, non_blocking=True) for t in y]
        grad_accum = len(xs)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
        last = i == len(xs) - 1
        # DDP: all-reduce the gradients once, after the last micro-batch; FSDP reduce-scatters
        # each micro-batch's into the shards (skipping would keep whole gradients on every rank)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        no_sync = model.no_sync() if (ddp and not last) else contextlib.nullcontext()
        with no_sync:
            with autocast_context(device, dtype):
                _, loss = model(xm, ym, return_logits=False)
            loss_sum += loss.detach().double()
            scaled = loss / grad_accum
            if scaler is not None:
                scaled = scaler.scale(scaled)
            scaled.backward()
    loss_sum /= grad_accum
    if distributed:
        ctx.all_reduce_sum(loss_sum)
        loss_sum /= ctx.world_size
    loss_value = float(loss_sum)
    if not math.isfinite(loss_value):
        raise NonFiniteError("loss", loss_value)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in params_model.parameters() if p.grad is not None]
    # max_norm inf: the norm only, nothing clipped
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        params, grad_clip if grad_clip > 0 else float("inf")))
    if scaler is not None:
        scaler.step(optimizer)  # skips the step itself on inf/nan gradients
        scaler.update()
    else:
        if not math.isfinite(grad_norm):
            raise NonFiniteError("gradient norm", grad_norm)
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm
