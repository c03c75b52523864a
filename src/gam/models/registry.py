"""``build_model(name, preset, **overrides)``: the one factory the CLI, benchmarks and tests use.

Names: gam, gam-global-only, gam-local-only, gam-sum (paper Table 3), transformer,
transformer-naive, mamba (residual stacking), mamba-paper (the paper's bare stack).

Presets fix the sizes shared by all families:

- ``paper``: vocab 10000, 256 tokens, d 512, 6 layers, 512 slots, kernel 3, 8 heads,
  Mamba d_state 16 / d_conv 4 / expand 3, dropout 0.1 (GAM: 22,599,680 parameters).
- ``cpu-small``: d 256, 4 layers, 256 slots, 4 heads (~5.5M parameters for GAM): one epoch of
  WikiText-2 trains in a few minutes on a 2-core CPU in bf16.
- ``tiny``: for tests (d 32, 2 layers, vocab 256, 64 tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch.nn as nn

from gam.models.gam import GAMLM, GAMConfig
from gam.models.lm import CausalLM, LMConfig
from gam.models.transformer import TransformerConfig, TransformerLM

PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(vocab_size=10000, max_seq_len=256, d_model=512, n_layers=6, dropout=0.1,
                  num_memory_slots=512, conv_kernel_size=3, n_heads=8,
                  d_state=16, d_conv=4, expand=3),
    "cpu-small": dict(vocab_size=10000, max_seq_len=256, d_model=256, n_layers=4, dropout=0.1,
                      num_memory_slots=256, conv_kernel_size=3, n_heads=4,
                      d_state=16, d_conv=4, expand=3),
    "tiny": dict(vocab_size=256, max_seq_len=64, d_model=32, n_layers=2, dropout=0.0,
                 num_memory_slots=16, conv_kernel_size=3, n_heads=4,
                 d_state=4, d_conv=4, expand=2),
}


def _mamba_classes() -> tuple[type[LMConfig], type[CausalLM]]:
    from gam.models.mamba import MambaConfig, MambaLM

    return MambaConfig, MambaLM


def _gam() -> tuple[type[LMConfig], type[CausalLM]]:
    return GAMConfig, GAMLM


def _transformer() -> tuple[type[LMConfig], type[CausalLM]]:
    return TransformerConfig, TransformerLM


# name -> (classes, fixed settings that define the variant)
MODELS: dict[str, tuple[Callable[[], tuple[type[LMConfig], type[CausalLM]]], dict[str, Any]]] = {
    "gam": (_gam, {}),
    "gam-global-only": (_gam, dict(use_local=False, use_gate=False)),
    "gam-sum": (_gam, dict(use_gate=False)),
    "gam-local-only": (_gam, dict(use_global=False, use_gate=False)),
    "transformer": (_transformer, dict(attention="sdpa")),
    "transformer-naive": (_transformer, dict(attention="naive")),
    "mamba": (_mamba_classes, dict(stacking="residual")),
    "mamba-paper": (_mamba_classes, dict(stacking="paper")),
}


def config_class(name: str) -> type[LMConfig]:
    """The config dataclass of a registered model name."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name][0]()[0]


def model_config(name: str, preset: str = "paper", **overrides: Any) -> LMConfig:
    """The config ``build_model`` would use, without building the model."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODELS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    classes, variant = MODELS[name]
    config_cls, _ = classes()
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for model {name!r}; expected some of "
                         f"{sorted(known)}")
    values = {k: v for k, v in PRESETS[preset].items() if k in known}
    values.update(variant)
    values.update(overrides)
    return config_cls(**values)


def build_model(name: str, preset: str = "paper", **overrides: Any) -> CausalLM:
    """Build a model by name with a size preset; keyword overrides change any config field
    (e.g. ``build_model("gam", "tiny", vocab_size=1000, max_seq_len=128)``)."""
    config = model_config(name, preset, **overrides)
    return model_from_config(name, config)


def model_from_config(name: str, config: LMConfig) -> CausalLM:
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODELS)}")
    _, model_cls = MODELS[name][0]()
    model = model_cls(config)
    model.model_name = name
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters (tied weights counted once) and non-embedding parameters (without the
    token embedding / tied head and the position embedding, as nanoGPT counts)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = 0
    for attr in ("token_embedding", "pos_embedding"):
        module = getattr(model, attr, None)
        if module is not None:
            embedding += module.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def receptive_field(model_or_config: CausalLM | LMConfig) -> int:
    """Tokens (the current one included) that can influence a position's logits: for GAM
    1 + n_layers * (kernel - 1); for attention and Mamba the whole context (max_seq_len)."""
    if isinstance(model_or_config, CausalLM):
        return model_or_config.receptive_field
    if isinstance(model_or_config, GAMConfig):
        from gam.models.gam import gam_receptive_field

        return gam_receptive_field(model_or_config)
    return model_or_config.max_seq_len
