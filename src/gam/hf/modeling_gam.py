"""gam models as Hugging Face causal LMs: ``GAMModel`` (AutoModel) and ``GAMForCausalLM``.

Both wrap a library model of any registered family (attribute ``gam``: a ``GAMLM``,
``GAMDeltaLM``, ``TransformerLM``, ``MambaLM``, ..., built by the registry from
``config.gam_model_name``): its embeddings, blocks, final norm and head are used as they are,
so the weights and the numerics are the library's. The wrapper only uses the shell's protocol
(``lm.py``: the blocks' ``forward`` / ``prefill`` / ``step``, or the shell's
``forward_blocks`` / ``prefill_blocks`` / ``step_blocks`` where a family overrides them), so a
family added to the registry works without changes here. Around it, what HF expects:

* **Cache** (``gam.hf.cache.GAMCache``): every block's decode state, the family's own, plus
  the number of tokens consumed and each row's next position; ``reorder_cache`` for beam search.
* **Padding** (``gam.hf.padding``): ``attention_mask`` zeros mark padding. Positions come from
  the mask (``cumsum - 1``), so each row's real tokens get the positions they would have alone,
  and left-padded batches give each row the output of its prompt alone, in every family.
* ``labels`` (shifted inside, -100 ignored), ``output_hidden_states``, ``logits_to_keep``,
  ``inputs_embeds`` and gradient checkpointing of the blocks.
* ``save_pretrained`` writes the remote-code entry points and ``auto_map`` beside the weights
  (``GAMHFConfig.save_pretrained``), so every folder it writes, a fine-tuned model's included,
  loads with ``trust_remote_code=True`` in a fresh interpreter. The entry point
  ``modeling_gam.py`` of every such folder imports ``GAMForCausalLM`` and ``GAMModel`` from
  this module: they stay here.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from gam.constants import IGNORE_INDEX
from gam.hf.cache import CACHE_ARG, GAMCache, RowGroup, given_cache, output_cache
from gam.hf.configuration_gam import HF_MODEL_NAMES, GAMHFConfig
from gam.hf.padding import (
    block_pass,
    masked_forward,
    masks_padding,
    plain_stack,
    row_layout,
    rows_by_lead,
    scatter_rows,
)
from gam.hf.pretrained import GAMPreTrainedModel
from gam.models.lm import CausalLM
from gam.models.registry import model_from_config

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


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
        self._masks_padding = plain_stack(self.gam) and all(map(masks_padding, self.gam.blocks))
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
        cache: GAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: GAMCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """``hidden_states`` (with ``output_hidden_states``): the embeddings, the output of
        every block but the last, and the final normalised state (n_layers + 1 tensors, the
        last equal to ``last_hidden_state``). gam models have no attention maps (``attentions``
        is None).

        The cache is the fourth argument, as in every HF model, under the name transformers
        gives it from 5.24 on; ``past_key_values``, the earlier name, is taken by keyword (one
        of the two at most)."""
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
        cache = given_cache(cache, past_key_values)

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
        lead, closed = row_layout(current, started, B, T)
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
        for start, rows in rows_by_lead(lead, x.shape[1]):
            y, group_states = self._blocks_parallel(x[rows.to(x.device), start:], None,
                                                    want_hidden)
            out = scatter_rows(out, rows, start, y)
            states = [scatter_rows(s, rows, start, g) for s, g in zip(states, group_states,
                                                                      strict=False)]
        return out, states

    def _blocks_parallel(self, x: torch.Tensor, pad_mask: torch.Tensor | None,
                         want_hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        lm = self.gam
        checkpointing = self.gradient_checkpointing and self.training
        if not plain_stack(lm):  # the family's own pass (pad_mask is None here)
            if checkpointing and not want_hidden:  # the whole stack as one checkpoint
                return self._gradient_checkpointing_func(
                    lambda t: lm.forward_blocks(t)[0], x), []
            return lm.forward_blocks(x, want_hidden)
        states = []
        for block in lm.blocks:
            if want_hidden:
                states.append(x)
            fn = block if pad_mask is None else partial(masked_forward, block,
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
                parts = [(start, rows, None) for start, rows in rows_by_lead(lead, T, group.rows)]
                if lead[group.rows].eq(T).any():
                    groups.append(RowGroup(group.rows[lead[group.rows] == T], None))
            else:
                parts = [(0, group.rows, group.layers)]
            for start, rows, layers in parts:
                y, layers, group_states = self._group_pass(x[rows.to(x.device), start:], layers,
                                                           None, want_hidden)
                out = scatter_rows(out, rows, start, y)
                states = [scatter_rows(s, rows, start, g) for s, g in zip(states, group_states,
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
        if not plain_stack(lm):  # the family's own passes (pad_mask is None here)
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
            x, layers[i] = block_pass(block, x, layers[i], pad_mask)
        if want_hidden:
            states.append(x)
        return x, layers, states



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
                         position_ids=position_ids, cache=given_cache(cache, past_key_values),
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
