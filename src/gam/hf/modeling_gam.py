"""GAM as a Hugging Face causal LM: ``GAMModel`` (AutoModel) and ``GAMForCausalLM``.

Both wrap a library model of a GAM family (attribute ``gam``: a ``GAMLM``, ``GAMDeltaLM``, ...,
built by the registry from ``config.gam_model_name``): its embeddings,
blocks, final norm and tied head are used as they are, so the weights and the numerics are the
library's. The wrapper adds what HF expects around them:

* **Cache** (:class:`GAMCache`): per block, the block's decode state (``GAMBlock``: its last
  k-1 LayerNorm-ed inputs, (B, k-1, C); ``GAMDeltaBlock``: those plus its delta-rule memory),
  plus the number of tokens consumed and each row's next position. O(1) in the context length;
  ``reorder_cache`` for beam search.
* **Padding**: ``attention_mask`` zeros mark padding. Positions come from the mask
  (``cumsum - 1``), so each row's real tokens get the positions they would have alone, and the
  normalised conv inputs of padded tokens are zeroed in every block, which is exactly the zero
  padding a row alone sees before its start. Left-padded batches therefore give each row the
  output of its prompt alone.
* ``labels`` (shifted inside, -100 ignored), ``output_hidden_states``, ``logits_to_keep``,
  ``inputs_embeds`` and gradient checkpointing of the blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from gam.constants import IGNORE_INDEX
from gam.hf.configuration_gam import HF_MODEL_NAMES, GAMHFConfig
from gam.models.lm import CausalLM
from gam.models.registry import model_from_config

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


class GAMCache(Cache):
    """Decode state of a GAM stack.

    ``conv_states[i]``: block i's decode state: for GAM its last ``conv_kernel_size - 1``
    normalised inputs, (B, k-1, C), oldest first (zeros stand for positions before a row's start
    and for its padding); for gam-delta a ``GAMDeltaState`` (those, the q/k/v conv windows and
    the (B, H, d_k, d_v) memory);
    ``seq_len``: tokens consumed so far, padding included (``get_seq_length``);
    ``next_position``: (B,) position of each row's next token (its real tokens so far).

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
        self.conv_states: list[torch.Tensor | None] = [None] * num_layers
        self.seq_len = 0
        self.next_position: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"GAMCache(num_layers={self.num_layers}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size})")

    def __len__(self) -> int:
        return self.num_layers

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

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.conv_states = [_map_state(s, fn) for s in self.conv_states]
        if self.next_position is not None:
            self.next_position = fn(self.next_position)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep, for every row, the state of row ``beam_idx[row]`` (beam search)."""
        self._map(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda s: s[indices.to(s.device)])

    def reset(self) -> None:
        self.conv_states = [None] * self.num_layers
        self.seq_len = 0
        self.next_position = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a GAMCache cannot be cropped: the conv state does not keep "
                                  "older tokens")


def _map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a block's decode state (a tensor, or a NamedTuple of
    tensors such as gam-delta's)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    return type(state)(*(_map_state(s, fn) for s in state))


def _block_extend(block: nn.Module, x: torch.Tensor, state: torch.Tensor | None,
                  pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``block`` on T new tokens x (B, T, C) that follow ``state`` (None = the start),
    with padded tokens (``pad_mask`` (B, T) False) masked: ``GAMBlock.extend``."""
    return block.extend(x, state, pad_mask)


def _masked_forward(block: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    return _block_extend(block, x, None, pad_mask)[0]


class GAMPreTrainedModel(PreTrainedModel):
    """Weights initialisation, checkpointing and generation settings shared by the GAM models."""

    config_class = GAMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GAMBlock", "GAMDeltaBlock"]
    _is_stateful = True  # no assisted generation: the conv state cannot be rolled back
    _supports_cache_class = True  # transformers 4

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
        self.gradient_checkpointing = False
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
        last equal to ``last_hidden_state``). GAM has no attention maps (``attentions`` is
        None)."""
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

        current = self._current_mask(attention_mask, past, B, T)
        positions, next_position = self._positions(position_ids, current, cache, B, T, device)
        self._check_positions(positions, current)
        pad_mask = None if current is None or bool(current.all()) else current

        x = lm.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if lm.pos_embedding is not None:
            x = x + lm.pos_embedding(positions)  # (B, T, C)
        x = lm.dropout(x)

        checkpointing = self.gradient_checkpointing and self.training
        all_hidden: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        for i, block in enumerate(lm.blocks):
            if all_hidden is not None:
                all_hidden += (x,)
            if cache is None:
                fn = block if pad_mask is None else partial(_masked_forward, block,
                                                            pad_mask=pad_mask)
                x = self._gradient_checkpointing_func(fn, x) if checkpointing else fn(x)
                continue
            state = cache.conv_states[i]
            if pad_mask is None and state is None:
                x, state = block.prefill(x)
            elif pad_mask is None and T == 1:
                y, state = block.step(x[:, 0], state)
                x = y[:, None]
            else:
                x, state = _block_extend(block, x, state, pad_mask)
            cache.conv_states[i] = state
        x = lm.ln_f(x)  # (B, T, C)
        if all_hidden is not None:
            all_hidden += (x,)
        if cache is not None:
            cache.seq_len += T
            cache.next_position = next_position

        out_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (x, out_cache, all_hidden) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=all_hidden,
                                       attentions=None, **{CACHE_ARG: out_cache})


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
