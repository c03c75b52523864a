"""Model FLOPs per token, counted from the architecture.

Convention (one multiply-add = 2 FLOPs; a training step = 3 x the forward: the backward
computes gradients for activations and for weights, 2 x the forward):

- every ``nn.Linear`` (the blocks' projections, GAM's gate, the FFNs and the head tied to the
  embedding): ``2 * in * out`` per token. Embedding look-ups, biases, norms, activations and
  softmaxes are not counted;
- every ``nn.Conv1d`` (GAM's causal depthwise conv, Mamba's conv): ``2 * (in/groups) * out * k``
  (its taps);
- the context-mixing work that is no Linear or Conv1d, as each block reports it
  (``mixing_flops``, the family interface of ``gam.models.lm``): GAM's memory bank (S slots x C)
  used twice per token, scores ``h M^T`` and readout ``softmax(.) M``: ``2 x 2*S*C``; causal
  self-attention ``2 x 2*T*C`` per layer per token for ``QK^T`` and ``AV`` with the full
  sequence length T, **not** halved for the causal mask (the PaLM / Chinchilla convention; pass
  ``causal_halved=True`` for ``2*T*C``); Mamba's selective scan ``9 * d_inner * d_state`` (the
  convention of the ``mamba_ssm`` reference FLOP counter); gam-delta's chunked delta rule (see
  ``DeltaRuleMemory.mixing_flops``).

For GAM at paper size (d 512, 6 layers, 512 slots, kernel 3, vocab 10000) the forward per token
is 6 x (gate 1.05M + memory 1.05M + FFN 4.19M + conv 3k) + head 10.24M = 48.0 MFLOP, i.e.
144.0 MFLOP per training token; the paper Transformer at T 256 has 153.4 MFLOP.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.nn as nn

from gam.models.blocks import block_mixing_flops
from gam.models.lm import CausalLM, LMConfig
from gam.models.registry import MODELS, config_class, model_config, model_from_config


def _name_for_config(config: LMConfig) -> str:
    for name in MODELS:
        try:
            if config_class(name) is type(config):
                return name
        except ImportError:
            continue
    raise ValueError(f"no registered model family uses config class {type(config).__name__}")


def _build_meta(name: str, config: LMConfig) -> CausalLM:
    """The model with parameters on the meta device (no memory, no init cost); on a CPU if a
    family's init does not support meta tensors."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return model_from_config(name, config)
    except Exception:  # noqa: BLE001 - fall back to a real build
        return model_from_config(name, config)


def _category(module_name: str) -> str:
    parts = module_name.split(".")
    if parts[0] == "head":
        return "head"
    leaf = parts[-1]
    if "ffn" in parts or "mlp" in parts:
        return "ffn"
    return leaf


def forward_flops_breakdown(model: CausalLM | nn.Module, seq_len: int,
                            causal_halved: bool = False) -> dict[str, float]:
    """Forward FLOPs per token, summed over layers, by kind (``head``, ``ffn``, ``gate``,
    ``memory``, ``attention``, ``scan``, conv and projection names...)."""
    out: dict[str, float] = defaultdict(float)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[_category(name)] += 2.0 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv1d):
            k = module.kernel_size[0]
            out["conv"] += 2.0 * (module.in_channels // module.groups) * module.out_channels * k
    # the context-mixing work that is not a Linear or a Conv1d: each block says (lm.py)
    for block in getattr(model, "blocks", []):
        for kind, flops in block_mixing_flops(block, seq_len, causal_halved).items():
            out[kind] += flops
    return dict(out)


def _resolve(name_or_config: str | LMConfig | CausalLM, preset: str, overrides: dict[str, Any]
             ) -> CausalLM | nn.Module:
    if isinstance(name_or_config, nn.Module):
        return name_or_config
    if isinstance(name_or_config, LMConfig):
        return _build_meta(_name_for_config(name_or_config), name_or_config)
    config = model_config(name_or_config, preset, **overrides)
    return _build_meta(name_or_config, config)


def flops_breakdown(name_or_config: str | LMConfig | CausalLM, seq_len: int,
                    training: bool = True, preset: str = "paper", causal_halved: bool = False,
                    **overrides: Any) -> dict[str, float]:
    """FLOPs per token by kind (x3 when ``training``), plus ``total``."""
    model = _resolve(name_or_config, preset, overrides)
    mult = 3.0 if training else 1.0
    parts = {k: v * mult for k, v in forward_flops_breakdown(model, seq_len,
                                                             causal_halved).items()}
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(name_or_config: str | LMConfig | CausalLM, seq_len: int,
                    training: bool = True, preset: str = "paper", causal_halved: bool = False,
                    **overrides: Any) -> float:
    """Model FLOPs per token at sequence length ``seq_len``: 3 x forward when ``training``
    (forward + backward), the forward alone otherwise.

    ``name_or_config``: a registry name (built with ``preset`` and ``overrides``), a config, or
    a model. See the module docstring for what is counted.
    """
    return flops_breakdown(name_or_config, seq_len, training, preset, causal_halved,
                           **overrides)["total"]
