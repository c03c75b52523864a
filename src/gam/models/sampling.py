"""Settings and the draw of sampled generation (``CausalLM.generate``): temperature, top-k
and top-p (nucleus) sampling."""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import torch


def warn_cropped(limit: int) -> None:
    """Warn that generation ran past the model's ``max_seq_len`` (the context is cropped)."""
    # 4 = past generate_stream and torch.no_grad's generator wrapper: the caller's loop
    warnings.warn(f"generation passed max_seq_len={limit}: the oldest tokens are dropped and "
                  f"each new token sees only the last {limit}", stacklevel=4)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    """ValueError for a generation setting out of range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) \
            or temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral)
                              or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real)
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits (B, V) -> token ids (B,): greedy at temperature 0, otherwise sampling from the
    temperature-scaled distribution restricted to the top-k and the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the top one always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
