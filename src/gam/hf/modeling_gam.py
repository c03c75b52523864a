"""gam models as Hugging Face causal LMs: ``GAMModel`` (AutoModel) and ``GAMForCausalLM``.

Both wrap a library model of any registered family (attribute ``gam``: a ``GAMLM``,
``GAMDeltaLM``, ``TransformerLM``, ``MambaLM``, ..., built by the registry from
``config.gam_model_name``): its embeddings, blocks, final norm and head are used as they are,
so the weights and the numerics are the library's. The wrapper only uses the shell's protocol
(``lm.py``: the blocks' ``forward`` / ``prefill`` / ``step``, or the shell's
``forward_blocks`` / ``prefill_blocks`` / ``step_blocks`` where a family overrides them), so a
family added to the registry works without changes here. Around it, what HF expects:

* **Cache** (:class:`GAMCache`): every block's decode state, the family's own (GAM's last
  k-1 normalised inputs, the Transformer's KV cache, Mamba's conv and SSM state, ...), plus the
  number of tokens consumed and each row's next position; ``reorder_cache`` for beam search.
* **Padding**: ``attention_mask`` zeros mark padding. Positions come from the mask
  (``cumsum - 1``), so each row's real tokens get the positions they would have alone. The GAM
  families (blocks with ``extend(x, state, pad_mask)``) zero the normalised conv inputs of
  padded tokens in every block, exactly the zero padding a row alone sees before its start;
  for every other family the rows of each left-padding length run together without their
  padding (one decode state per group in the cache). Left-padded batches therefore give each
  row the output of its prompt alone, in every family. Right padding is fine without a cache
  (the models are causal); a cache that ends in padding cannot be continued (a clear error),
  nor can padding sit between a row's real tokens.
* ``labels`` (shifted inside, -100 ignored), ``output_hidden_states``, ``logits_to_keep``,
  ``inputs_embeds`` and gradient checkpointing of the blocks.
* ``save_pretrained`` writes the remote-code entry points and ``auto_map`` beside the weights
  (``GAMHFConfig.save_pretrained``), so every folder it writes, a fine-tuned model's included,
  loads with ``trust_remote_code=True`` in a fresh interpreter.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from gam.constants import IGNORE_INDEX
from gam.hf.configuration_gam import HF_MODEL_NAMES, GAMHFConfig, save_with_remote_code
from gam.models.lm import CausalLM
from gam.models.registry import model_from_config

logger = logging.get_logger(__name__)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: What this transformers release calls the cache, as a forward/generate argument and as a model
#: output field: ``cache`` from 5.24 on (where ``past_key_values`` is deprecated, with a warning),
#: ``past_key_values`` before. The models accept both names in ``forward``.
CACHE_ARG = ("cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)}
             else "past_key_values")


def output_cache(output: Any) -> GAMCache | None:
    """The cache a model output or a ``generate(..., return_dict_in_generate=True)`` result
    holds, whichever name this transformers release gives it (no deprecation warning)."""
    return output.get(CACHE_ARG)


def _one_cache(cache: GAMCache | None, past_key_values: GAMCache | None) -> GAMCache | None:
    """The cache passed to ``forward`` under either name (both at once is an error)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    cache = past_key_values if cache is None else cache
    if cache is not None and not isinstance(cache, GAMCache):
        raise TypeError(f"GAM's cache must be a GAMCache (returned by the model), got "
                        f"{type(cache).__name__}")
    return cache


@dataclass
class RowGroup:
    """Batch rows that share one decode state: ``rows`` (b,) their indices in the batch (on the
    CPU), ``layers`` one state per block with batch b, None while the rows have seen only
    padding."""

    rows: torch.Tensor
    layers: list[Any] | None


class GAMCache(Cache):
    """Decode state of a gam model, any family.

    ``groups``: the batch's rows in groups that share one decode state (a ``RowGroup``: one
    state per block, the family's: GAM its last ``conv_kernel_size - 1`` normalised inputs,
    gam-delta a ``GAMDeltaState``, the Transformer its KV cache, Mamba a ``MambaState``, ...).
    A family whose blocks mask padding themselves (``extend(x, state, pad_mask)``: the GAM
    families) keeps the whole batch in one group; for the others each left-padding length is a
    group whose real tokens are run without the padding, so every row gets what it gets alone.
    ``seq_len``: tokens consumed so far, padding included (``get_seq_length``);
    ``next_position``: (B,) position of each row's next token (its real tokens so far);
    ``closed``: (B,) rows whose state ends in padding (right padding), which cannot be
    continued.

    ``generate`` and the forward create it; pass ``GAMCache(config=model.config)`` as the
    cache (``cache=`` from transformers 5.24, ``past_key_values=`` before; ``CACHE_ARG`` names
    it) to keep it after ``generate`` or for chunked prefill; ``output_cache(out)`` reads it.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int | None = None, config: GAMHFConfig | None = None) -> None:
        if num_layers is None:
            if config is None:
                raise ValueError("GAMCache needs num_layers or config")
            num_layers = config.n_layers
        try:
            super().__init__(layers=[])  # transformers 5: the base class holds attention layers
        except TypeError:
            super().__init__()  # transformers 4
        self.num_layers = num_layers
        self.groups: list[RowGroup] = []
        self.seq_len = 0
        self.next_position: torch.Tensor | None = None
        self.closed: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"GAMCache(num_layers={self.num_layers}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, groups={len(self.groups)})")

    def __len__(self) -> int:
        return self.num_layers

    @property
    def conv_states(self) -> list[Any]:
        """The blocks' states of the whole batch, when one group holds it in order (always for
        the GAM families); [None] * num_layers before the first token."""
        if not self.groups:
            return [None] * self.num_layers
        group = self.groups[0]
        if len(self.groups) > 1 or not torch.equal(group.rows, torch.arange(len(group.rows))):
            raise ValueError("the cache holds its rows in several groups (left padding of a "
                             "family without pad masking): read cache.groups")
        return list(group.layers) if group.layers is not None else [None] * self.num_layers

    @conv_states.setter
    def conv_states(self, layers: list[Any]) -> None:
        batch = next((t.shape[0] for t in _tensors(layers)), None)
        if batch is None:
            raise ValueError("conv_states must hold at least one tensor (batch first)")
        self.groups = [RowGroup(torch.arange(batch), list(layers))]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seq_len

    @property
    def is_linear(self) -> list[bool]:
        # transformers >= 5.24 trims a prompt that continues a cache to the tokens the cache has
        # not seen only when the cache is not all "linear attention" layers (then it feeds the
        # whole sequence again). This state continues exactly after get_seq_length() tokens,
        # so it needs the trimming: re-fed tokens would be written into the memory twice.
        return [False] * self.num_layers

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no sequence dimension: the state has a fixed size

    def get_max_cache_shape(self, layer_idx: int | None = 0) -> None:
        return None  # transformers 4 name of the above (None = unbounded)

    @property
    def batch_size(self) -> int:
        if self.next_position is None:
            return -1
        return self.next_position.shape[0]

    def _select(self, src: torch.Tensor) -> None:
        """Row r of the new batch is row ``src[r]`` of the old one (beam search reordering,
        expansion, selection); each group keeps its own state, restricted to its rows."""
        src = src.to("cpu", torch.long)
        if self.groups:
            old = self.batch_size if self.batch_size >= 0 else int(src.max()) + 1
            group_of = torch.full((old,), -1, dtype=torch.long)
            local_of = torch.zeros(old, dtype=torch.long)
            for g, group in enumerate(self.groups):
                group_of[group.rows] = g
                local_of[group.rows] = torch.arange(len(group.rows))
            groups = []
            for g, group in enumerate(self.groups):
                new_rows = (group_of[src] == g).nonzero()[:, 0]
                if not len(new_rows):
                    continue
                local = local_of[src[new_rows]]
                layers = None if group.layers is None else [
                    _map_state(s, lambda t, i=local: t.index_select(0, i.to(t.device)))
                    for s in group.layers]
                groups.append(RowGroup(new_rows, layers))
            self.groups = groups
        if self.next_position is not None:
            self.next_position = self.next_position[src.to(self.next_position.device)]
        if self.closed is not None:
            self.closed = self.closed[src.to(self.closed.device)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep, for every row, the state of row ``beam_idx[row]`` (beam search)."""
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(torch.arange(max(self.batch_size, 0)).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def reset(self) -> None:
        self.groups = []
        self.seq_len = 0
        self.next_position = None
        self.closed = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a GAMCache cannot be cropped: a recurrent state does not keep "
                                  "older tokens")


def _tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor of a decode state, in order."""
    found: list[torch.Tensor] = []
    _map_state(state, lambda t: found.append(t) or t)
    return found


def _map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a block's decode state: a tensor, a NamedTuple, tuple,
    list or dict of them (the Transformer's KV cache), a dataclass or a plain object; other
    leaves (a stored length) are kept."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: _map_state(v, fn) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # NamedTuple
        return type(state)(*(_map_state(s, fn) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_map_state(s, fn) for s in state)
    if is_dataclass(state) and not isinstance(state, type):
        return replace(state, **{f.name: _map_state(getattr(state, f.name), fn)
                                 for f in fields(state) if f.init})
    if hasattr(state, "__dict__"):
        other = copy.copy(state)
        other.__dict__.update({k: _map_state(v, fn) for k, v in vars(state).items()})
        return other
    return state


def _masks_padding(block: nn.Module) -> bool:
    """Whether the block's ``extend`` takes a ``pad_mask`` (GAMBlock's protocol): it then runs
    left-padded rows in one batch by itself."""
    extend = getattr(block, "extend", None)
    return callable(extend) and "pad_mask" in inspect.signature(extend).parameters


def _plain_stack(lm: CausalLM) -> bool:
    """Whether the blocks only hand each other the residual stream (the shell's own block
    passes): then the wrapper may run them one by one (checkpointing, hidden states)."""
    return all(getattr(type(lm), name) is getattr(CausalLM, name)
               for name in ("forward_blocks", "prefill_blocks", "step_blocks"))


def _block_pass(block: nn.Module, x: torch.Tensor, state: Any, pad_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, Any]:
    """Run ``block`` on T new tokens x (B, T, C) that follow ``state`` (None = the start):
    prefill, one step, ``extend`` (chunked continuation; with ``pad_mask`` (B, T) False at
    padding, the GAM families' masking) or one step per token."""
    if pad_mask is None and state is None:
        return block.prefill(x)
    if pad_mask is None and x.shape[1] == 1:
        y, state = block.step(x[:, 0], state)
        return y[:, None], state
    if pad_mask is not None or hasattr(block, "extend"):
        return _block_extend(block, x, state, pad_mask)
    ys = []
    for t in range(x.shape[1]):
        y, state = block.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _block_extend(block: nn.Module, x: torch.Tensor, state: Any,
                  pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """``block.extend``: T new tokens after ``state``, padded tokens (``pad_mask`` False)
    masked (only passed when given: a family's extend may not take it)."""
    if pad_mask is None:
        return block.extend(x, state)
    return block.extend(x, state, pad_mask)


def _masked_forward(block: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    return _block_extend(block, x, None, pad_mask)[0]


def _row_layout(current: torch.Tensor | None, started: torch.Tensor | None, B: int, T: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's leading padding (B,) and whether it ends in padding (B,) (right padding:
    its state cannot be continued). A row's real tokens must be one run (padding between real
    tokens, or before the new tokens of a row that has real tokens in the cache, is refused:
    no family could give the row what it gives alone)."""
    if current is None:
        return torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool)
    mask = current.cpu()
    if started is not None:  # real tokens in the cache count as a run that started before
        before = started.cpu()[:, None]
    else:
        before = torch.zeros(B, 1, dtype=torch.bool)
    runs = (mask & ~torch.cat([before, mask[:, :-1]], dim=1)).sum(dim=1)
    bad = (runs > 1) | ((runs == 1) & before[:, 0])
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens (or before "
                         f"the new tokens of a row the cache has tokens of): gam models take "
                         f"padding before a row's tokens (left) or after them (right) only")
    lead = torch.where(mask.any(dim=1), mask.long().argmax(dim=1), torch.full((B,), T))
    seen = (mask.long().cumsum(dim=1) > 0) | before
    closed = (seen & ~mask).any(dim=1)
    return lead, closed


def _scatter_rows(out: torch.Tensor, rows: torch.Tensor, lead: int, values: torch.Tensor
                  ) -> torch.Tensor:
    """``out`` with ``values`` (b, T - lead, C) written at rows ``rows``, positions lead..T-1
    (out of place, so gradients flow)."""
    positions = torch.arange(lead, out.shape[1], device=out.device)
    return out.index_put((rows.to(out.device)[:, None], positions[None, :]), values)


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


class GAMModel(GAMPreTrainedModel):
    """The GAM stack: ``last_hidden_state`` is the final LayerNorm-ed hidden state (B, T, C)."""

    # Tied (the default), the head and the token embedding are one tensor; as in every HF LM,
    # the file stores the input embedding and the head is the tied target (transformers 4
    # re-ties head <- embedding after loading, so this direction also keeps files
    # interchangeable between 4 and 5). transformers ties only when tie_word_embeddings is set.
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"gam.head.weight": "gam.token_embedding.weight"}
    else:
        _tied_weights_keys = ["gam.head.weight"]

    def __init__(self, config: GAMHFConfig) -> None:
        super().__init__(config)
        self.gam = model_from_config(config.gam_model_name, config.to_gam_config())
        # The head last, as in every HF LM: a tied weight is then named after the token
        # embedding (named_parameters keeps the first name), the name the file stores and the
        # tying maps from, so transformers 5 sees it missing when the file lacks it.
        self.gam._modules["head"] = self.gam._modules.pop("head")
        self.gradient_checkpointing = False
        # left padding: masked by the blocks themselves (GAM), or run row group by row group
        self._masks_padding = _plain_stack(self.gam) and all(map(_masks_padding, self.gam.blocks))
        self._no_split_modules = sorted({type(b).__name__ for b in self.gam.blocks})
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gam.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.gam.token_embedding = value
        if self.config.tie_embeddings:
            self.gam.head.weight = value.weight

    # ------------------------------------------------------------------ inputs
    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got "
                             f"{tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is outside "
                                 f"[0, {self.config.vocab_size}) (vocab_size)")

    @staticmethod
    def _current_mask(attention_mask: torch.Tensor | None, past: int, B: int, T: int
                      ) -> torch.Tensor | None:
        """The (B, T) bool mask of the new tokens (True = real), from a 2D attention mask that
        covers the cached tokens and the new ones (HF convention) or only the new ones."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
            raise ValueError(f"GAM takes a 2D attention_mask (batch, seq_len) of 1 for tokens and "
                             f"0 for padding, got shape {tuple(attention_mask.shape)} for a batch "
                             f"of {B}")
        length = attention_mask.shape[1]
        if length == past + T:
            current = attention_mask[:, past:]
        elif length == T:
            current = attention_mask
        else:
            raise ValueError(f"attention_mask covers {length} tokens, expected {past + T} (the "
                             f"{past} cached tokens and the {T} new ones) or {T}")
        return current.bool()

    def _positions(self, position_ids: torch.Tensor | None, current: torch.Tensor | None,
                   cache: GAMCache | None, B: int, T: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the new tokens (B, T) and each row's next position (B,).

        Without ``position_ids``: a row continues from its cached next position (0 at the
        start) and only its real tokens advance it, so a left-padded row numbers its tokens
        0.. exactly as the prompt alone (padding gets position 0)."""
        if position_ids is not None:
            positions = position_ids.to(device=device, dtype=torch.long).expand(B, T)
            return positions, positions[:, -1] + 1
        start = torch.zeros(B, dtype=torch.long, device=device)
        if cache is not None and cache.next_position is not None:
            start = cache.next_position.to(device)
        if current is None:
            raw = start[:, None] + torch.arange(T, device=device)  # (B, T)
            return raw, raw[:, -1] + 1
        raw = start[:, None] + current.long().cumsum(dim=1) - 1  # (B, T)
        return raw.clamp(min=0), raw[:, -1] + 1

    def _check_positions(self, positions: torch.Tensor, current: torch.Tensor | None) -> None:
        if torch.compiler.is_compiling() or positions.numel() == 0:
            return
        real = positions if current is None else positions.masked_fill(~current, 0)
        top, low = int(real.max()), int(real.min())
        if low < 0:
            raise ValueError(f"position ids must be >= 0, got {low}")
        if top >= self.config.max_seq_len:
            raise ValueError(
                f"token position {top} is beyond the model's context: GAM was built with "
                f"max_seq_len (max_position_embeddings) {self.config.max_seq_len}; keep prompt + "
                f"new tokens within it (e.g. generate(..., max_length={self.config.max_seq_len}))")

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: GAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: GAMCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """``hidden_states`` (with ``output_hidden_states``): the embeddings, the output of
        every block but the last, and the final normalised state (n_layers + 1 tensors, the
        last equal to ``last_hidden_state``). gam models have no attention maps (``attentions``
        is None)."""
        cfg = self.config
        if output_hidden_states is None:
            output_hidden_states = cfg.output_hidden_states
        if return_dict is None:
            return_dict = cfg.return_dict
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # a cache would keep every block's inputs alive
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = _one_cache(cache, past_key_values)

        lm = self.gam
        if input_ids is not None:
            self._check_input_ids(input_ids)
            B, T = input_ids.shape
            device = input_ids.device
        else:
            B, T = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if T == 0:
            raise ValueError("the input must hold at least one token per row, got seq_len 0")
        if cache is None and use_cache:
            cache = GAMCache(cfg.n_layers)
        past = cache.get_seq_length() if cache is not None else 0
        if past and cache.closed is not None and bool(cache.closed.any()):
            raise ValueError("the cache holds a row that ended in padding (right padding), whose "
                             "state includes the padding: pad on the left to continue from a "
                             "cache, or run the whole sequence again")

        current = self._current_mask(attention_mask, past, B, T)
        started = None if cache is None or cache.next_position is None \
            else cache.next_position > 0
        lead, closed = _row_layout(current, started, B, T)
        positions, next_position = self._positions(position_ids, current, cache, B, T, device)
        self._check_positions(positions, current)
        pad_mask = None if current is None or bool(current.all()) else current

        x = lm.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if lm.pos_embedding is not None:
            x = x + lm.pos_embedding(positions)  # (B, T, C)
        x = lm.dropout(x)

        if cache is None:
            x, states = self._parallel(x, pad_mask, lead, output_hidden_states)
        else:
            x, states = self._cached(x, pad_mask, lead, cache, output_hidden_states)
            cache.seq_len += T
            cache.next_position = next_position
            cache.closed = closed.to(device) if cache.closed is None \
                else cache.closed | closed.to(device)
        x = lm.ln_f(x)  # (B, T, C)
        all_hidden = None
        if output_hidden_states:
            all_hidden = tuple(states[:-1]) + (x,)

        out_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (x, out_cache, all_hidden) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=all_hidden,
                                       attentions=None, **{CACHE_ARG: out_cache})

    def _parallel(self, x: torch.Tensor, pad_mask: torch.Tensor | None, lead: torch.Tensor,
                  want_hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks over x (B, T, C) without a cache: the last block's output and (if asked)
        every block's input plus that output. Left-padded rows: masked in the blocks by the
        families that can (GAM), otherwise each padding length's rows run without it."""
        if pad_mask is None or self._masks_padding:
            return self._blocks_parallel(x, pad_mask, want_hidden)
        out = torch.zeros_like(x)
        states = [torch.zeros_like(x) for _ in range(len(self.gam.blocks) + 1)] \
            if want_hidden else []
        for start, rows in _rows_by_lead(lead, x.shape[1]):
            y, group_states = self._blocks_parallel(x[rows.to(x.device), start:], None,
                                                    want_hidden)
            out = _scatter_rows(out, rows, start, y)
            states = [_scatter_rows(s, rows, start, g) for s, g in zip(states, group_states,
                                                                       strict=False)]
        return out, states

    def _blocks_parallel(self, x: torch.Tensor, pad_mask: torch.Tensor | None,
                         want_hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        lm = self.gam
        checkpointing = self.gradient_checkpointing and self.training
        if not _plain_stack(lm):  # the family's own pass (pad_mask is None here)
            if checkpointing and not want_hidden:  # the whole stack as one checkpoint
                return self._gradient_checkpointing_func(
                    lambda t: lm.forward_blocks(t)[0], x), []
            return lm.forward_blocks(x, want_hidden)
        states = []
        for block in lm.blocks:
            if want_hidden:
                states.append(x)
            fn = block if pad_mask is None else partial(_masked_forward, block,
                                                        pad_mask=pad_mask)
            x = self._gradient_checkpointing_func(fn, x) if checkpointing else fn(x)
        if want_hidden:
            states.append(x)
        return x, states

    def _cached(self, x: torch.Tensor, pad_mask: torch.Tensor | None, lead: torch.Tensor,
                cache: GAMCache, want_hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks over x (B, T, C) continuing ``cache`` (updated in place)."""
        B, T = x.shape[:2]
        if not cache.groups:
            cache.groups = [RowGroup(torch.arange(B), None)]
        if self._masks_padding:  # one group: the blocks mask the padding themselves
            group = cache.groups[0]
            y, group.layers, states = self._group_pass(x, group.layers, pad_mask, want_hidden)
            return y, states
        out = torch.zeros_like(x)
        states = [torch.zeros_like(x) for _ in range(len(self.gam.blocks) + 1)] \
            if want_hidden else []
        groups = []
        for group in cache.groups:
            if group.layers is None:  # rows that have seen only padding: split by this chunk's
                parts = [(start, rows, None) for start, rows in _rows_by_lead(lead, T, group.rows)]
                if lead[group.rows].eq(T).any():
                    groups.append(RowGroup(group.rows[lead[group.rows] == T], None))
            else:
                parts = [(0, group.rows, group.layers)]
            for start, rows, layers in parts:
                y, layers, group_states = self._group_pass(x[rows.to(x.device), start:], layers,
                                                           None, want_hidden)
                out = _scatter_rows(out, rows, start, y)
                states = [_scatter_rows(s, rows, start, g) for s, g in zip(states, group_states,
                                                                           strict=False)]
                groups.append(RowGroup(rows, layers))
        cache.groups = groups
        return out, states

    def _group_pass(self, x: torch.Tensor, layers: list[Any] | None,
                    pad_mask: torch.Tensor | None, want_hidden: bool
                    ) -> tuple[torch.Tensor, list[Any], list[torch.Tensor]]:
        """Rows that share one decode state (``layers``, None at the start): x (b, T, C)
        through the blocks; returns the output, the new states and (if asked) the blocks'
        inputs plus the output."""
        lm = self.gam
        if not _plain_stack(lm):  # the family's own passes (pad_mask is None here)
            if want_hidden:
                raise ValueError(f"output_hidden_states with a cache is not available for "
                                 f"{self.config.gam_model_name!r} (its blocks pass more than "
                                 f"the residual stream); pass use_cache=False")
            if layers is None:
                y, layers = lm.prefill_blocks(x)
                return y, layers, []
            ys = [lm.step_blocks(x[:, t], layers) for t in range(x.shape[1])]
            return torch.stack(ys, dim=1), layers, []
        layers = [None] * len(lm.blocks) if layers is None else layers
        states = []
        for i, block in enumerate(lm.blocks):
            if want_hidden:
                states.append(x)
            x, layers[i] = _block_pass(block, x, layers[i], pad_mask)
        if want_hidden:
            states.append(x)
        return x, layers, states


def _rows_by_lead(lead: torch.Tensor, T: int, rows: torch.Tensor | None = None
                  ) -> list[tuple[int, torch.Tensor]]:
    """The rows (of ``rows``, default all) grouped by their leading padding: (start, rows) for
    every start < T (rows that are all padding are left out)."""
    rows = torch.arange(len(lead)) if rows is None else rows
    starts = lead[rows]
    return [(int(start), rows[starts == start]) for start in torch.unique(starts)
            if int(start) < T]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy with HF's convention: ``labels`` are the inputs (shifted here:
    position t predicts ``labels[:, t + 1]``), -100 is ignored; mean over the counted tokens,
    or their sum divided by ``num_items_in_batch`` (gradient accumulation in the Trainer)."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have the shape of the logits' tokens "
                         f"{tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    targets = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    logits = logits.float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class GAMForCausalLM(GAMPreTrainedModel, GenerationMixin):
    """GAM language model with its (tied) head: ``generate()``, ``labels`` loss, pipelines.

    ``model.gam`` is the wrapped library model (``gam.save_pretrained(model.gam, dir)``
    writes a library checkpoint); :meth:`from_gam` wraps an existing one.
    """

    def __init__(self, config: GAMHFConfig) -> None:
        super().__init__(config)
        self.model = GAMModel(config)
        self.post_init()

    @property
    def gam(self) -> CausalLM:
        """The wrapped library model (shares the parameters)."""
        return self.model.gam

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``. An export's generation config sets ``max_length`` to
        the context, so that ``generate()`` and ``pipeline()`` without a length stop there; a
        call that asks for ``max_new_tokens`` (and no ``max_length``) gets exactly those, as
        transformers gives them, but without its warning that both lengths are set."""
        config = kwargs.get("generation_config")
        asks_new = kwargs.get("max_new_tokens") is not None or (
            config is not None and getattr(config, "max_new_tokens", None) is not None)
        default_length = self.generation_config.max_length
        if not asks_new or kwargs.get("max_length") is not None or default_length is None:
            return super().generate(*args, **kwargs)
        self.generation_config.max_length = None
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.generation_config.max_length = default_length

    @classmethod
    def from_gam(cls, lm: CausalLM, **config_kwargs: Any) -> GAMForCausalLM:
        """A ``GAMForCausalLM`` holding a copy of ``lm``'s weights (same dtype and device);
        ``config_kwargs`` set HF config attributes (token ids, ...)."""
        name = getattr(lm, "model_name", None)
        if not isinstance(lm, CausalLM) or name not in HF_MODEL_NAMES:
            raise TypeError(f"from_gam takes a gam model of a GAM family {HF_MODEL_NAMES} "
                            f"(built by gam.build_model), got {type(lm).__name__} {name!r}")
        config = GAMHFConfig.from_gam_config(lm.config, name, **config_kwargs)
        param = next(lm.parameters())
        model = cls(config).to(device=param.device, dtype=param.dtype)
        model.gam.load_state_dict(lm.state_dict())
        return model.train(lm.training)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.gam.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.gam.head = value
        if self.config.tie_embeddings:
            self.model.gam.token_embedding.weight = value.weight

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: GAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: GAMCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, vocab) and, with ``labels`` (B, T), the shifted next-token loss.

        ``logits_to_keep``: an int n computes only the last n positions' logits (0 = all), a
        tensor selects positions (``generate`` uses 1)."""
        if return_dict is None:
            return_dict = self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=_one_cache(cache, past_key_values),
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True)
        out_cache = output_cache(out)
        hidden = out.last_hidden_state  # (B, T, C)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.model.gam.head(hidden[:, keep, :])  # (B, T', V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        if not return_dict:
            rest = tuple(v for v in (out_cache, out.hidden_states) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      attentions=None, **{CACHE_ARG: out_cache})
