"""A textbook pre-LN Transformer language model, the reference of ``gam bench recall``.

Built from ``torch.nn`` parts with their own defaults, independently of ``gam.models``, so
that a recall failure of the library's Transformer can be told apart from a failure of the
task or of the protocol: ``nn.TransformerEncoder`` (``norm_first=True``, GELU, FFN 4 d,
dropout 0) under a causal mask, an ``nn.Embedding`` token table (its default N(0, 1)),
learned positions N(0, 1), a final LayerNorm and an untied ``nn.Linear`` head (its default
U(+-1/sqrt(d))). Bench-only: it has the ``forward(idx) -> (logits, loss)`` and
``receptive_field`` the benchmark uses, and no decoding methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.constants import IGNORE_INDEX


@dataclass
class TextbookConfig:
    vocab_size: int
    max_seq_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TextbookTransformerLM(nn.Module):
    def __init__(self, config: TextbookConfig) -> None:
        super().__init__()
        c = self.config = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.d_model)  # N(0, 1)
        # a matrix Parameter, not an nn.Embedding: the nanogpt decay filter decays it
        self.pos_embedding = nn.Parameter(torch.randn(c.max_seq_len, c.d_model))  # N(0, 1)
        layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.ffn_mult * c.d_model,
                                           dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        # nested tensors only serve padding masks, and norm_first disables them anyway
        self.encoder = nn.TransformerEncoder(layer, c.n_layers, norm=nn.LayerNorm(c.d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.model_name = "textbook-transformer"

    @property
    def receptive_field(self) -> int:
        return self.config.max_seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                return_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and the mean cross-entropy; ``return_logits`` is accepted for the
        library's training step (the logits are small here, so they are always returned)."""
        t = idx.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.token_embedding(idx) + self.pos_embedding[:t]  # (B, T, C)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        logits = self.head(self.encoder(x, mask=mask, is_causal=True))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss
