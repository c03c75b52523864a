"""GAM as a Hugging Face ``transformers`` causal LM (optional extra: ``pip install 'gam[hf]'``).

Importing ``gam.hf`` registers the ``"gam"`` model type with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``::

    import gam.hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("exported/")   # written by `gam export`
    tokenizer = AutoTokenizer.from_pretrained("exported/")

``import gam`` does not import this package, so the core library works without transformers.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gam.hf needs the Hugging Face transformers package: pip install 'gam[hf]' "
        "(or pip install 'transformers>=4.46')") from exc

from gam.hf.cache import CACHE_ARG, GAMCache, output_cache
from gam.hf.configuration_gam import HF_MODEL_NAMES, GAMHFConfig
from gam.hf.modeling_gam import GAMForCausalLM, GAMModel, causal_lm_loss
from gam.hf.pretrained import GAMPreTrainedModel


def register() -> None:
    """Register the ``"gam"`` model type with the Auto classes (idempotent; done on import)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(GAMHFConfig.model_type, GAMHFConfig, exist_ok=True)
    AutoModel.register(GAMHFConfig, GAMModel, exist_ok=True)
    AutoModelForCausalLM.register(GAMHFConfig, GAMForCausalLM, exist_ok=True)


register()


def __getattr__(name: str) -> object:  # lazy: `python -m gam.hf.export` then runs cleanly
    if name == "export_run":
        from gam.hf.export import export_run

        return export_run
    raise AttributeError(f"module 'gam.hf' has no attribute {name!r}")


__all__ = [
    "CACHE_ARG", "GAMCache", "GAMForCausalLM", "GAMHFConfig", "GAMModel",
    "GAMPreTrainedModel", "HF_MODEL_NAMES", "causal_lm_loss", "export_run", "output_cache",
    "register",
]
