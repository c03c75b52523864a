"""AdamW with the paper's weight-decay rule (or nanoGPT's) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gam.models.blocks import OptimizerHint, flagged_no_weight_decay, parameter_optimizer_hints
from gam.training.config import DECAY_FILTERS, TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float, decay_filter: str = "all",
                     lr: float | None = None) -> list[dict]:
    """Optimizer parameter groups: the decay filter's groups, then one group per distinct
    optimizer hint of the family (:class:`gam.models.blocks.OptimizerHint`).

    ``all`` (the official GAM code): one group, every (unhinted) parameter decayed.
    ``nanogpt`` (minGPT/nanoGPT style): no decay for parameters with fewer than 2 dimensions
    (biases, LayerNorm weights), for embedding tables (token embedding = tied output head, and
    position embedding) and for the parameters a family keeps out of weight decay
    (``gam.models.blocks.flagged_no_weight_decay``: e.g. Mamba's A_log, D; declared by name on
    their module, so that the flag holds also for the DTensor parameters of an FSDP model).

    A hinted parameter (e.g. S4D's log_A_real, A_imag, log_dt) is left out of the filter's
    groups: its group has the hint's weight decay (None: ``weight_decay``) and, when the hint
    caps the learning rate, its own peak ``"lr": min(lr, lr_max)``; the schedule scales every
    group's peak by the same multiplier (``WarmupCosine``), so the capped group's learning rate
    is ``min(lr, lr_max) / lr`` times the run's at every step. ``lr`` (the run's peak) is
    needed only for a model with a capped parameter. The filter's groups come first (group 0 is
    the one whose learning rate is logged) and are those of a model without hints.
    """
    if decay_filter not in DECAY_FILTERS:
        raise ValueError(f"unknown decay filter {decay_filter!r}; expected 'all' or 'nanogpt'")
    hinted = [(p, hint) for p, hint in parameter_optimizer_hints(model) if p.requires_grad]
    hinted_ids = {id(p) for p, _ in hinted}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in hinted_ids]
    if decay_filter == "all":
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:
        no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        no_decay_ids.update(id(p) for p in flagged_no_weight_decay(model))
        decay, no_decay = [], []
        for p in params:
            if p.dim() < 2 or id(p) in no_decay_ids:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    by_hint: dict[OptimizerHint, dict] = {}
    for p, hint in hinted:
        if hint not in by_hint:
            group = by_hint[hint] = {"params": [], "weight_decay": weight_decay
                                     if hint.weight_decay is None else hint.weight_decay}
            if hint.lr_max is not None:
                if lr is None:
                    raise ValueError("parameter_groups needs the run's lr: the model caps the "
                                     f"learning rate of some parameters at {hint.lr_max}")
                group["lr"] = min(lr, hint.lr_max)
        by_hint[hint]["params"].append(p)
    return groups + list(by_hint.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups; the fused kernel (one pass over each parameter
    instead of a dozen elementwise ops) where torch has it for this device."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_filter, cfg.lr)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    device = next(model.parameters()).device.type
    if device in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # e.g. a dtype or device the fused kernel lacks
            pass
    return torch.optim.AdamW(groups, **kwargs)


class WarmupCosine:
    """LR multiplier at 0-based optimizer step ``s``: ``(s + 1) / warmup`` during warm-up, then
    a cosine from 1 down to ``min_lr / lr`` at ``total_steps``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` saves its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + 0.5 * (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    fn = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr / cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def retarget_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Make a (restored) warm-up + cosine schedule end at ``total_steps`` instead.

    Used when a resumed run is extended or shortened: the cosine is recomputed for the new
    total from the step the run is at, and the learning rate of the next step is set from it
    (the restored optimizer still holds the one the old schedule gave).
    """
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, WarmupCosine):
            fn.total_steps = int(total_steps)
    step = scheduler.last_epoch
    groups = scheduler.optimizer.param_groups
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in groups]
