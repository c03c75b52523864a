"""gam: Gated Associative Memory (arXiv 2509.00605) with Transformer and Mamba baselines."""

from gam.models import (
    GAMLM,
    MODELS,
    PRESETS,
    CausalLM,
    CheckpointError,
    GAMConfig,
    TransformerConfig,
    build_model,
    count_parameters,
    load_official,
    load_pretrained,
    model_config,
    receptive_field,
    save_pretrained,
)

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "CheckpointError", "GAMConfig", "GAMLM", "MODELS", "PRESETS", "TransformerConfig",
    "build_model", "count_parameters", "load_official", "load_pretrained", "model_config",
    "receptive_field", "save_pretrained", "__version__",
]
