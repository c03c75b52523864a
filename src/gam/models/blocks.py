"""What the families' blocks share: the norms (``make_norm``), the feed-forward layers
(``FeedForward``, ``SwiGLU``) and the defaults of the optional block methods that the tools
reporting on a model call (``block_gate_paths``, ``block_mixing_flops``,
``block_decode_state_bytes``; the block interface is described in :mod:`gam.models.lm`), and
the optimizer hints a family may give its parameters (``OptimizerHint``,
``parameter_optimizer_hints``) and the parameters it keeps out of weight decay
(``flagged_no_weight_decay``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.models.ops.fused import Dropout

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, d_model: int) -> nn.Module:
    """A norm over the last dimension: ``"layernorm"`` (weight and bias, eps 1e-5) or
    ``"rmsnorm"`` (weight only, eps 1e-6, as Llama)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=1e-6)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class FeedForward(nn.Module):
    """d -> ffn_mult * d -> GELU -> d -> dropout, as in the paper's blocks."""

    def __init__(self, d_model: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_mult * d_model)
        self.fc2 = nn.Linear(ffn_mult * d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """FFN(x), or ``residual + FFN(x)`` with the add fused into the dropout."""
        return self.dropout(self.fc2(F.gelu(self.fc1(x))), residual)  # (..., C)


class SwiGLU(nn.Module):
    """W2(silu(W1 x) * W3 x) -> dropout, no biases (Llama's MLP; names w1 gate, w3 up, w2
    down), for the Llama-style families."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MLP(x), or ``residual + MLP(x)`` with the add fused into the dropout."""
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), residual)  # (..., C)


def state_nbytes(state: Any) -> int:
    """Bytes of every tensor in a decode state (a tensor, or tuples / lists / dicts / objects
    such as ``DecodeCache`` holding them)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_nbytes(v) for v in state)
    if hasattr(state, "__dict__"):
        return sum(state_nbytes(v) for v in vars(state).values())
    return 0


def block_gate_paths(block: nn.Module) -> list[str]:
    """``block.gate_paths()``, or [] for a block without gates."""
    paths = getattr(block, "gate_paths", None)
    return list(paths()) if callable(paths) else []


def block_mixing_flops(block: nn.Module, seq_len: int, causal_halved: bool = False
                       ) -> dict[str, float]:
    """``block.mixing_flops(...)`` by kind, or {} for a block whose work is all Linear /
    Conv1d."""
    flops = getattr(block, "mixing_flops", None)
    if not callable(flops):
        return {}
    return {kind: float(v) for kind, v in flops(seq_len, causal_halved).items() if v}


def block_decode_state_bytes(block: nn.Module, state: Any) -> int:
    """``block.decode_state_bytes(state)``, or every tensor of the state."""
    used = getattr(block, "decode_state_bytes", None)
    return int(used(state)) if callable(used) else state_nbytes(state)


@dataclass(frozen=True)
class OptimizerHint:
    """How a family wants the optimizer to treat some of its parameters (e.g. S4D's SSM
    parameters: a smaller learning rate, no weight decay).

    ``lr_max``: a cap on the peak learning rate (None: the run's); ``weight_decay``: the
    parameters' weight decay whatever the run's decay filter (None: the run's weight decay).
    ``gam.training.optim.parameter_groups`` puts the parameters of each distinct hint in a group
    of their own, after the run's groups, with peak ``min(lr, lr_max)``."""

    lr_max: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.lr_max is not None and not (_finite(self.lr_max) and self.lr_max > 0):
            raise ValueError(f"OptimizerHint lr_max must be a positive number or None, got "
                             f"{self.lr_max!r}")
        if self.weight_decay is not None and not (_finite(self.weight_decay)
                                                  and self.weight_decay >= 0):
            raise ValueError(f"OptimizerHint weight_decay must be a number >= 0 or None, got "
                             f"{self.weight_decay!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _declared_parameters(model: nn.Module, declared: Callable[[nn.Module], dict[str, Any]]
                         ) -> Iterator[tuple[str, nn.Parameter, Any]]:
    """``(full name, parameter, value)`` for every ``{parameter name within the module: value}``
    that ``declared`` gives of each submodule of ``model``, in module order. A name resolves to
    the parameter the module holds now, also after a wrapper such as FSDP replaced it (which
    drops anything set on the old parameter tensor: what a family says of its parameters is
    said on its module, by name)."""
    for prefix, module in model.named_modules():
        for name, value in declared(module).items():
            yield (f"{prefix}.{name}" if prefix else name), module.get_parameter(name), value


def parameter_optimizer_hints(model: nn.Module) -> list[tuple[nn.Parameter, OptimizerHint]]:
    """The hinted parameters of ``model``: every submodule with an ``optimizer_hints()`` method
    (``{parameter name within that module: OptimizerHint}``) contributes, in module order, each
    parameter once. A name resolves to the parameter the module holds now (also after a
    wrapper such as FSDP replaced it); a parameter given two different hints is a ValueError."""
    def hints(module: nn.Module) -> dict[str, OptimizerHint]:
        method = getattr(module, "optimizer_hints", None)
        return method() if callable(method) else {}

    hinted: dict[int, tuple[nn.Parameter, OptimizerHint, str]] = {}
    for where, param, hint in _declared_parameters(model, hints):
        seen = hinted.setdefault(id(param), (param, hint, where))
        if seen[1] != hint:
            raise ValueError(f"parameter {where} (also {seen[2]}) has two optimizer hints, "
                             f"{seen[1]} and {hint}")
    return [(param, hint) for param, hint, _ in hinted.values()]


def flagged_no_weight_decay(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` its families keep out of weight decay whatever their shape
    (Mamba's A_log and D, ...), which the ``nanogpt`` decay filter exempts: every submodule's
    ``no_weight_decay_names`` (names of parameters within that module), each parameter once, in
    module order. Resolved by name on the module, so the flags survive FSDP's replacing of the
    parameters. A parameter that carries a ``_no_weight_decay`` attribute on the tensor instead
    (which FSDP drops) is a ValueError."""
    def names(module: nn.Module) -> dict[str, bool]:
        return dict.fromkeys(getattr(module, "no_weight_decay_names", ()), True)

    flagged = {id(param): param for _, param, _ in _declared_parameters(model, names)}
    for where, param in model.named_parameters():
        if getattr(param, "_no_weight_decay", False) and id(param) not in flagged:
            raise ValueError(f"parameter {where} is flagged _no_weight_decay on the tensor, "
                             f"which FSDP drops; list it in its module's no_weight_decay_names")
    return list(flagged.values())
