"""Model families (one file each) sharing the LM shell of ``lm.py``, and the factory."""

from gam.models.gam import GAMLM, GAMBlock, GAMConfig, gam_receptive_field
from gam.models.io import CheckpointError, load_pretrained, save_pretrained
from gam.models.lm import CausalLM, DecodeCache, LMConfig
from gam.models.official import load_official
from gam.models.registry import (
    MODELS,
    PRESETS,
    build_model,
    config_class,
    count_parameters,
    model_config,
    model_from_config,
    receptive_field,
)
from gam.models.sampling import sample_next_token
from gam.models.transformer import TransformerConfig, TransformerLM

__all__ = [
    "CausalLM", "CheckpointError", "DecodeCache", "GAMBlock", "GAMConfig", "GAMLM", "LMConfig",
    "MODELS", "PRESETS", "TransformerConfig", "TransformerLM", "build_model", "config_class",
    "count_parameters", "gam_receptive_field", "load_official", "load_pretrained", "model_config",
    "model_from_config", "receptive_field", "sample_next_token", "save_pretrained",
]
