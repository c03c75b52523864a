"""``GAMCache``: the decode state of a gam model of any family, as Hugging Face's ``Cache``.

Every block's decode state, the family's own (GAM's last k-1 normalised inputs, the
Transformer's KV cache, Mamba's conv and SSM state, ...), in groups of rows that share one state
(``RowGroup``), plus the number of tokens consumed and each row's next position;
``reorder_cache`` for beam search. ``CACHE_ARG`` and ``output_cache`` hide what the installed
transformers calls the cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from gam.hf.configuration_gam import GAMHFConfig

#: What this transformers release calls the cache, as a forward/generate argument and as a model
#: output field: ``cache`` from 5.24 on (where ``past_key_values`` is deprecated, with a warning),
#: ``past_key_values`` before. The models accept both names in ``forward``.
CACHE_ARG = ("cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)}
             else "past_key_values")


def output_cache(output: Any) -> GAMCache | None:
    """The cache a model output or a ``generate(..., return_dict_in_generate=True)`` result
    holds, whichever name this transformers release gives it (no deprecation warning)."""
    return output.get(CACHE_ARG)


def given_cache(cache: GAMCache | None, past_key_values: GAMCache | None) -> GAMCache | None:
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

