"""The language-model shell shared by every family (GAM, Transformer, Mamba).

Token (+ learned position, ``pos_embedding``) embeddings -> dropout -> N blocks -> final norm
(``final_norm``) -> head (tied to the token embedding by default), exactly as the paper's GAM
model; a family without learned positions (rotary, recurrent) sets ``pos_embedding=False``.
Each family only supplies its block, so the models differ in the sequence mixer alone.

A block implements three methods:

- ``forward(x)``: (B, T, C) -> (B, T, C), the parallel training path;
- ``prefill(x)``: (B, T, C) -> ((B, T, C), state), the same computation that also returns the
  block's decode state after the last token;
- ``step(x, state)``: (B, C) -> ((B, C), state), one token of cached decoding.

and, for ``CausalLM.init_weights`` (both optional: a block without them has no residual
projections and no family parameters):

- ``residual_projections()``: the last nn.Linear of each residual branch (scaled down by
  ``init="gpt2"``);
- ``reset_family_parameters()``: re-draw the parameters with a family-specific init (memory
  bank, SSM parameters, ...), which every scheme keeps.

and, for the tools that report on a model (all optional, with the defaults in brackets), so
that they never need to know a family:

- ``gate_paths()``: names of the paths its sigmoid gate weighs, in the order of the gate
  Linear's output chunks (GAM: ``local``, ``global``; gam-delta adds ``delta``) [no gates];
- ``mixing_flops(seq_len, causal_halved)``: forward FLOPs per token of the context-mixing work
  that is not an ``nn.Linear`` or ``nn.Conv1d``, by kind (GAM ``memory``, ``attention``,
  Mamba's ``scan``, gam-delta's ``delta``) [none];
- ``decode_state_bytes(state)``: bytes of a decode state in use (a preallocated KV cache
  counts its filled part) [every tensor in the state, ``state_nbytes``].

and, for the optimizer (optional, on any submodule, not only a block):

- ``optimizer_hints()``: ``{parameter name within the module: OptimizerHint}``, parameters the
  family wants trained with a capped peak learning rate and / or their own weight decay (S4D's
  SSM parameters; ``gam.models.blocks.OptimizerHint``, read by
  ``gam.training.optim.parameter_groups``) [none: every parameter follows the run's recipe];
- ``no_weight_decay_names``: names of parameters within the module that the ``nanogpt`` decay
  filter exempts whatever their shape (Mamba's A_log; read by
  ``gam.models.blocks.flagged_no_weight_decay``), by name because FSDP replaces the parameter
  tensors (an attribute set on them is lost) [none].

The receptive field is a property of the config (``LMConfig.receptive_field``). A family
whose blocks hand each other more than the residual stream (RWKV-7's first-layer values)
overrides ``CausalLM.forward_blocks`` / ``prefill_blocks`` / ``step_blocks``.

The decode state is family specific (GAM: the last kernel-1 normalised conv inputs; Transformer:
the KV cache; Mamba: conv inputs and SSM state) and is documented next to each ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn

from gam.models.blocks import NORMS, make_norm
from gam.models.inputs import check_target_ids, check_token_ids
from gam.models.ops.fused import Dropout
from gam.models.ops.losses import linear_cross_entropy, mean_cross_entropy
from gam.models.sampling import check_sampling, sample_next_token, warn_cropped

INIT_SCHEMES = ("paper", "gpt2", "untied")
#: The default, chosen by measurement (docs/results.md, "Fair initialisation: the default
#: init"): the only scheme under which every family that can recall learns MQAR, at a
#: WikiText-2 perplexity close to the best.
DEFAULT_INIT = "untied"
GPT2_STD = 0.02
# What each scheme means when tie_embeddings / pos_embedding_std are left as None.
SCHEME_TIES = {"paper": True, "gpt2": True, "untied": False}
SCHEME_POS_STD = {"paper": 1.0, "gpt2": GPT2_STD, "untied": GPT2_STD}
# What configs saved before ``init`` / ``tie_embeddings`` existed were built with: they load
# with these values whatever the defaults become.
LEGACY_INIT = {"init": "paper", "tie_embeddings": True}


@dataclass
class LMConfig:
    """Fields every family shares. Family configs subclass this and add their own.

    ``init`` chooses the distributions (applied by ``CausalLM.init_weights``; d = d_model,
    L = n_layers), ``tie_embeddings`` whether the head is the token embedding (False adds a
    separate vocab x d head weight; None: the scheme's choice, resolved when the config is
    built), ``pos_embedding_std`` the positions' std (None: the scheme's):

    - ``"paper"``: the official code's init, i.e. every module's PyTorch default: the official
      distributions, and bit for bit what gam drew for a given torch seed before this setting
      existed (the official script draws its modules in another order, and its memory bank
      from a discarded randn, so its numbers for a seed differ). Tied: the shared weight takes
      the head's nn.Linear init U(-1/sqrt(d), 1/sqrt(d)) (std 1/sqrt(3d)), since the official
      code ties by giving the embedding the head's weight. Untied: token embedding
      nn.Embedding's N(0, 1), head U(+-1/sqrt(d)) (the textbook nn.TransformerEncoder LM).
      Positions N(0, 1). Every
      nn.Linear weight and bias U(+-1/sqrt(fan_in)), LayerNorm weight 1 / bias 0, plus the
      family parameters below; residual Mamba's out_proj is divided by sqrt(L) (mamba-ssm's
      prenorm-residual rescale).
    - ``"untied"`` (the default): ``"paper"`` with the head untied (token embedding
      nn.Embedding's N(0, 1), head nn.Linear's U(+-1/sqrt(d))) and positions N(0, 0.02); every
      other tensor as ``"paper"``. The textbook embedding with positions at the token scale.
    - ``"gpt2"``: GPT-2 / nanoGPT (tied unless told otherwise). Token embedding, untied head,
      positions and every nn.Linear weight N(0, 0.02), nn.Linear biases 0, LayerNorm weight 1 /
      bias 0; the residual projections, the last nn.Linear of each residual branch
      (``residual_projections()``: attention ``proj`` and FFN ``fc2`` for the Transformer; FFN
      ``fc2`` only for GAM, whose gated conv + memory branch has no output Linear; ``out_proj``
      for residual Mamba; none for ``mamba-paper``, which has no residual), N(0, 0.02 /
      sqrt(2 L)) in every family. GAM's gate is an ordinary Linear: N(0, 0.02), bias 0, so both
      gates start near 0.5.

    In every scheme the family parameters keep the family's init (``reset_family_parameters``):
    GAM's memory bank Xavier uniform; Mamba's A_log = log(1..d_state) (S4D-real), D = 1 and
    dt_proj (weight U(+-dt_rank^-0.5), bias softplus^-1 of a step log-uniform in [1e-3, 1e-1]);
    and convolutions (GAM's depthwise conv, Mamba's conv1d) keep nn.Conv1d's default.
    ``pos_embedding_std``, when set, replaces the scheme's position std (1, 0.02, 0.02).
    ``init="paper"`` alone is the official code: tied, positions N(0, 1).
    """

    # What a config saved or recorded before a field existed was built with (a family adds
    # its own fields): it loads, and its run resumes, with these values whatever the defaults.
    LEGACY: ClassVar[dict[str, Any]] = LEGACY_INIT

    vocab_size: int = 10000
    max_seq_len: int = 256
    d_model: int = 512
    n_layers: int = 6
    ffn_mult: int = 4
    dropout: float = 0.1
    pos_embedding: bool = True
    # The shell's last norm before the head: "layernorm" (the paper's families) or "rmsnorm"
    # (Llama-style families). Blocks build their own norms with ``make_norm`` too.
    final_norm: str = "layernorm"
    # None: the init scheme's (paper: nn.Embedding's N(0, 1), much larger than the tied token
    # embedding's +-1/sqrt(d) uniform; gpt2 and untied: 0.02); a number: N(0, std) in every
    # scheme.
    pos_embedding_std: float | None = None
    init: str = DEFAULT_INIT
    tie_embeddings: bool | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "ffn_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        std = self.pos_embedding_std
        if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float))
                                or not std > 0):
            raise ValueError(f"pos_embedding_std must be a positive number or None (N(0, 1)), "
                             f"got {std!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if self.final_norm not in NORMS:
            raise ValueError(f"final_norm must be one of {NORMS}, got {self.final_norm!r}")
        if self.tie_embeddings is None:
            self.tie_embeddings = SCHEME_TIES[self.init]
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True, False or None (the init scheme's), "
                             f"got {self.tie_embeddings!r}")

    @property
    def position_std(self) -> float:
        """The std the position embedding is drawn with (``pos_embedding_std`` or the
        scheme's)."""
        if self.pos_embedding_std is not None:
            return float(self.pos_embedding_std)
        return SCHEME_POS_STD[self.init]

    @property
    def receptive_field(self) -> int:
        """Tokens (the current one included) that can influence a position's logits: the whole
        context unless a family's config says less (GAM)."""
        return self.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LMConfig:
        """Rebuild a saved config; a field it lacks takes its ``LEGACY`` value if it has one
        (one saved before ``init`` existed gets the paper init), else the default."""
        return dataclass_from_dict(cls, {**cls.LEGACY, **values})

    def as_recorded(self, recorded: dict[str, Any] | None) -> LMConfig:
        """This config with each ``LEGACY`` field as ``recorded`` (the ``to_dict()`` of the
        config a run was made with, as its record holds it) has it, or at its legacy value where
        the record lacks it: a run resumes as it was trained, even one made before the field
        existed or under another default. ``self`` is not changed."""
        if recorded is None:
            return self
        values = {k: recorded.get(k, v) for k, v in self.LEGACY.items()}
        if all(getattr(self, k) == v for k, v in values.items()):
            return self
        return replace(self, **values)


def dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` for a dataclass, with a ValueError naming unknown fields."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected some of "
                         f"{sorted(known)}")
    return cls(**values)


@dataclass
class DecodeCache:
    """State of cached decoding: one family-specific state per block, and how many tokens the
    model has consumed (the position of the next token)."""

    layers: list[Any]
    seq_len: int


class CausalLM(nn.Module):
    """Decoder-only language model; subclasses implement ``make_block(layer_idx)``."""

    config: LMConfig

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # The paper ties by giving the embedding the head's weight, so both start from
        # nn.Linear's init (uniform +-1/sqrt(d)); keep that to reproduce its curves.
        # The modules below draw their defaults in gam's construction order: that *is* the
        # "paper" init (bit for bit what gam drew before the init setting), so it is not
        # redrawn at the end ("untied" differs only in the tying and the positions' std).
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.token_embedding = nn.Embedding(c.vocab_size, c.d_model)
        if c.tie_embeddings:
            self.token_embedding.weight = self.head.weight
        self.pos_embedding = nn.Embedding(c.max_seq_len, c.d_model) if c.pos_embedding else None
        if self.pos_embedding is not None and (c.pos_embedding_std is not None
                                               or c.init != "paper"):
            nn.init.normal_(self.pos_embedding.weight, std=c.position_std)
        self.dropout = Dropout(c.dropout)
        self.blocks = nn.ModuleList([self.make_block(i) for i in range(c.n_layers)])
        self.ln_f = make_norm(c.final_norm, c.d_model)
        if c.init == "gpt2":
            self.init_weights()

    def make_block(self, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter with ``config.init`` (see ``LMConfig``), in place:
        the Parameter objects and the tying stay, so an optimizer or an outside wrapper (e.g.
        Hugging Face's ``_init_weights``) can call it. For ``"paper"`` / ``"untied"`` it draws
        the same distributions as construction but not the same numbers (construction draws
        module by module in the official code's order, this draws shell, then modules, then
        family parameters); for ``"gpt2"`` construction itself ends with this call."""
        self._check_init_scheme()
        tied = self.token_embedding.weight is self.head.weight
        self._init_shell_module(self.token_embedding if self.config.init == "gpt2" else self.head)
        if not tied:
            self._init_shell_module(self.head if self.config.init == "gpt2"
                                    else self.token_embedding)
        if self.pos_embedding is not None:
            self._init_shell_module(self.pos_embedding)
        self._init_shell_module(self.ln_f)
        for block in self.blocks:
            for module in block.modules():
                self._init_block_module(module)
            # after the generic pass, so a family parameter held by a Linear (Mamba's dt_proj)
            # keeps the family's init in every scheme
            if hasattr(block, "reset_family_parameters"):
                block.reset_family_parameters()
            for proj in self._residual_projections(block):
                self._init_residual_projection(proj)

    @torch.no_grad()
    def init_module_weights(self, module: nn.Module) -> None:
        """Re-draw only the parameters ``module`` holds itself (not its submodules'), as
        ``init_weights`` draws them; every other parameter keeps its value. For loaders that
        fill in the weights a checkpoint lacks, one module at a time (Hugging Face's
        ``_init_weights`` under transformers 5)."""
        self._check_init_scheme()
        own = dict(module.named_parameters(recurse=False))
        if not own:
            return
        if module in (self.token_embedding, self.head, self.pos_embedding, self.ln_f):
            self._init_shell_module(module)
            return
        block = next((b for b in self.blocks if any(m is module for m in b.modules())), None)
        if block is None:
            raise ValueError(f"init_module_weights: {type(module).__name__} is not a module of "
                             f"this model")
        self._init_block_module(module)
        if hasattr(block, "reset_family_parameters"):
            # the family init re-draws a whole block's worth of parameters (and may rescale one
            # drawn above): keep everything but this module's own
            own_ids = {id(p) for p in own.values()}
            kept = [(p, p.detach().clone()) for p in block.parameters() if id(p) not in own_ids]
            block.reset_family_parameters()
            for p, value in kept:
                p.copy_(value)
        if any(proj is module for proj in self._residual_projections(block)):
            self._init_residual_projection(module)

    # One rule per kind of module, shared by init_weights and init_module_weights.
    def _check_init_scheme(self) -> None:
        if self.config.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.config.init!r}")

    def _init_shell_module(self, module: nn.Module) -> None:
        """The token embedding, head, positions or final norm."""
        if module is self.pos_embedding:
            nn.init.normal_(module.weight, std=self.config.position_std)
        elif module is self.token_embedding or module is self.head:
            if self.config.init == "gpt2":
                nn.init.normal_(module.weight, std=GPT2_STD)
            elif self.token_embedding.weight is self.head.weight:
                self.head.reset_parameters()  # tied: the head's nn.Linear init (the paper's)
            else:
                module.reset_parameters()
        else:
            module.reset_parameters()

    def _init_block_module(self, module: nn.Module) -> None:
        """A module inside a block, before the family parameters."""
        if self.config.init == "gpt2" and isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=GPT2_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):  # norms, convs; everything in paper
            module.reset_parameters()

    def _residual_projections(self, block: nn.Module) -> list[nn.Linear]:
        if self.config.init != "gpt2" or not hasattr(block, "residual_projections"):
            return []
        return block.residual_projections()

    def _init_residual_projection(self, proj: nn.Module) -> None:
        # GPT-2: keeps the residual stream's variance O(1) in depth
        nn.init.normal_(proj.weight, std=GPT2_STD / math.sqrt(2 * self.config.n_layers))

    # ------------------------------------------------------------------ checks
    def check_input_ids(self, idx: torch.Tensor, start_pos: int = 0) -> None:
        """Raise ValueError for ids the model cannot take (rank, dtype, range, length)."""
        check_token_ids(idx, self.config.vocab_size, self.config.max_seq_len, start_pos)

    # ----------------------------------------------------------------- forward
    def embed(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        x = self.token_embedding(idx)  # (B, T, C)
        if self.pos_embedding is not None:
            pos = torch.arange(start_pos, start_pos + idx.shape[1], device=idx.device)
            x = x + self.pos_embedding(pos)  # (B, T, C) + (T, C)
        return self.dropout(x)

    def hidden_states(self, idx: torch.Tensor, output_all: bool = False
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normalised hidden states (B, T, C) and, if asked, the input of every block
        plus the last block's output (before the final norm)."""
        self.check_input_ids(idx)
        x, all_states = self.forward_blocks(self.embed(idx), output_all)  # (B, T, C)
        return self.ln_f(x), all_states

    # The three passes over the blocks. A family whose blocks hand each other more than the
    # residual stream (RWKV-7's first-layer values) overrides them; the rest of the shell
    # (checks, embedding, final norm, head, cache) stays shared.
    def forward_blocks(self, x: torch.Tensor, output_all: bool = False
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks' parallel pass over x (B, T, C): the last block's output and, if asked,
        the input of every block plus that output."""
        all_states = []
        for block in self.blocks:
            if output_all:
                all_states.append(x)
            x = block(x)  # (B, T, C)
        if output_all:
            all_states.append(x)
        return x, all_states

    def prefill_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """The blocks' prefill of x (B, T, C): the last output and every block's state."""
        states = []
        for block in self.blocks:
            x, state = block.prefill(x)  # (B, T, C)
            states.append(state)
        return x, states

    def step_blocks(self, x: torch.Tensor, layers: list[Any]) -> torch.Tensor:
        """One token x (B, C) through the blocks; ``layers`` (one state per block) is updated
        in place."""
        for i, block in enumerate(self.blocks):
            x, layers[i] = block.step(x, layers[i])  # (B, C)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with targets (B, T), the mean cross-entropy over targets
        that are not ``-100`` (0, with a zero gradient, when all targets are ``-100``).

        ``return_logits=False`` (with targets) returns ``(None, loss)`` and computes the loss
        through the head chunk by chunk (``losses.linear_cross_entropy``), never holding all
        B*T x vocab logits: what training uses.
        """
        x, _ = self.hidden_states(idx)  # (B, T, C)
        if targets is not None:
            check_target_ids(idx, targets, self.config.vocab_size)
        if targets is not None and not return_logits:
            loss = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.head.weight,
                                        targets.reshape(-1))
            return None, loss
        logits = self.head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = mean_cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---------------------------------------------------------- cached decode
    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> tuple[torch.Tensor, DecodeCache]:
        """Encode a prompt (B, T) in one parallel pass; return the logits of its last position
        (B, V) and the decode cache."""
        self.check_input_ids(idx)
        x, states = self.prefill_blocks(self.embed(idx))  # (B, T, C)
        logits = self.head(self.ln_f(x[:, -1]))  # (B, V)
        return logits, DecodeCache(layers=states, seq_len=idx.shape[1])

    @torch.no_grad()
    def step(self, token: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        """Consume one token per row (B,) at position ``cache.seq_len``; return its next-token
        logits (B, V). The cache is updated in place and returned."""
        if token.dim() != 1:
            raise ValueError(f"step takes one token per row, shape (batch,), got "
                             f"{tuple(token.shape)}")
        self.check_input_ids(token[:, None], start_pos=cache.seq_len)
        x = self.embed(token[:, None], start_pos=cache.seq_len)[:, 0]  # (B, C)
        x = self.step_blocks(x, cache.layers)  # (B, C)
        cache.seq_len += 1
        return self.head(self.ln_f(x)), cache  # (B, V)

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        eos_token_id: int | None = None, seed: int | None = None
                        ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (B,) as soon as it is sampled.

        The prompt is encoded in one parallel pass, then tokens come from the decode cache.
        Past max_seq_len the oldest tokens are dropped and the cache is rebuilt from the last
        max_seq_len tokens, which is what an uncached model that crops its input sees (with
        learned positions a shifted window needs a fresh pass).
        Rows that produced ``eos_token_id`` keep yielding it; the stream ends when all have.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        self.check_input_ids(idx)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(int(seed))
        limit = self.config.max_seq_len
        cropped = False
        context = idx[:, -limit:]
        logits, cache = self.prefill(context)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            yield token
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                return
            context = torch.cat([context, token[:, None]], dim=1)
            if cache.seq_len < limit:
                logits, cache = self.step(token, cache)
            else:
                if not cropped:  # once per call, not once per token
                    cropped = True
                    warn_cropped(limit)
                context = context[:, -limit:]
                logits, cache = self.prefill(context)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Prompt (B, T) -> prompt plus up to max_new_tokens sampled tokens (B, T + n).
        ``temperature=0`` is greedy decoding."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                        eos_token_id, seed))
        if not new:
            return idx
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)

    @property
    def receptive_field(self) -> int:
        """How many tokens (the current one included) can influence a position's logits
        (``LMConfig.receptive_field``)."""
        return self.config.receptive_field
