"""``GAMPreTrainedModel``: what the Hugging Face gam models share (``modeling_gam``): the
library's weight initialisation (also for weights a checkpoint lacks), gradient checkpointing,
generation settings, and a ``save_pretrained`` that writes the remote-code entry points."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.utils import logging

from gam.hf.configuration_gam import GAMHFConfig, save_with_remote_code
from gam.models.lm import CausalLM

logger = logging.get_logger(__name__)


class GAMPreTrainedModel(PreTrainedModel):
    """Weights initialisation, checkpointing and generation settings shared by the GAM models."""

    config_class = GAMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GAMBlock", "GAMDeltaBlock"]
    _is_stateful = True  # no assisted generation: the conv state cannot be rolled back
    _supports_cache_class = True  # transformers 4

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any,
                        **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained``; the folder also gets the remote-code entry
        points and ``auto_map`` (through the config's ``save_pretrained``), whether this model
        came from ``gam.hf``, from remote code or from a constructor, so a fine-tuned or
        re-saved model loads with ``trust_remote_code=True`` wherever ``gam`` is installed."""
        return save_with_remote_code(self, super().save_pretrained, save_directory, *args,
                                     **kwargs)

    def mark_tied_weights_as_initialized(self, loading_info: Any) -> None:
        """transformers 5 flags the Parameter of each tie target (the head) as loaded before it
        fills the missing weights. A gam model is tied at construction, so that Parameter is
        also the source (the token embedding): when the file lacks it, it would stay on the
        meta device, unreported. Such a source is marked missing again, so the loader
        materialises it, draws it per the config and reports it."""
        tied = getattr(self, "all_tied_weights_keys", None) or {}
        missing_sources = {source for source in tied.values()
                           if source in loading_info.missing_keys}
        super().mark_tied_weights_as_initialized(loading_info)
        for source in missing_sources:
            param = self.get_parameter(source)
            if getattr(param, "_is_hf_initialized", False):
                del param._is_hf_initialized
            loading_info.missing_keys.add(source)

    def tie_weights(self, *args: Any, **kwargs: Any) -> Any:
        """The base class's tying, then a check that no weight is left on the meta device (a
        loader that skipped one): any such weight is drawn per the config, named in a warning
        and added to the loader's missing keys."""
        result = super().tie_weights(*args, **kwargs)
        missing = kwargs.get("missing_keys", args[0] if args else None)
        self._fill_meta_weights(missing)
        return result

    @torch.no_grad()
    def _fill_meta_weights(self, missing: set[str] | None) -> None:
        lm = getattr(self, "gam", None)
        if not isinstance(lm, CausalLM):
            return
        params = dict(self.named_parameters(remove_duplicate=False))
        found = [name for name, p in params.items() if p.is_meta]
        if not found or len(found) == len(params):
            return  # nothing missing, or a model built on the meta device on purpose
        device = next(p.device for p in self.parameters() if not p.is_meta)
        for name in found:
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name)
            param = getattr(module, attr)
            if param.is_meta:
                setattr(module, attr, nn.Parameter(torch.empty_like(param, device=device),
                                                   requires_grad=param.requires_grad))
        if self.config.tie_embeddings:
            lm.head.weight = lm.token_embedding.weight
        for module in {self.get_submodule(n.rpartition(".")[0]) for n in found}:
            lm.init_module_weights(module)
        logger.warning(f"weights missing from the checkpoint, drawn per the config: "
                       f"{sorted(found)}")
        if missing is not None:
            missing.update(found)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its GAMCache itself.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The library's initialisation, whatever the config asks (``init``, ``tie_embeddings``,
        ``pos_embedding_std``), so that a model from ``from_config`` gets the distributions
        ``gam.build_model`` gives and a checkpoint's missing weights get them too. transformers
        4 visits the wrapped model itself (one ``CausalLM.init_weights``); transformers 5 only
        the modules that hold parameters directly, each re-drawn alone, leaving the ones it has
        already loaded (flagged ``_is_hf_initialized``) as they are."""
        if isinstance(module, CausalLM):
            module.init_weights()
            return
        lm = getattr(self, "gam", None)
        if not isinstance(lm, CausalLM):
            return  # during GAMModel.__init__, before the library model exists
        if module is lm.token_embedding and self.config.tie_embeddings \
                and lm.head.weight is not module.weight:
            lm.head.weight = module.weight  # untied by the loader: tie first, draw as tied
        loaded = [(p, p.detach().clone()) for p in module.parameters(recurse=False)
                  if getattr(p, "_is_hf_initialized", False)]
        lm.init_module_weights(module)
        for p, value in loaded:
            p.copy_(value)

