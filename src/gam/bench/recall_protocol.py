"""``gam bench recall``'s protocol (what a configuration's numbers depend on, its key, the
length mixture) and its models (registry families at the recall sizes, or the textbook
Transformer)."""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from gam.bench.tasks import family_overrides, parse_model_spec
from gam.bench.textbook_transformer import TextbookConfig, TextbookTransformerLM
from gam.models.registry import MODELS, model_config, model_from_config

TEXTBOOK = "textbook-transformer"
DEFAULT_SEQ_LENS = [64, 128, 256]
QUICK_SEQ_LENS = [32]
DEFAULT_PAIRS = [4, 8, 16]
# zoology's original MQAR training set mixes lengths (64 x 4 pairs is most of it) and the long
# cases are learned through the short ones: trained alone, T 256 stays at the copy plateau here
DEFAULT_MIX = [(64, 4)]
QUICK_PAIRS = [2, 4]
DEFAULT_LRS = [1e-3, 3e-3, 1e-2]
QUICK_LRS = [3e-3, 1e-2]
MAX_PAIR_FRACTION = 8  # pair counts with 8 P <= T: the pairs fill at most a quarter of T


def default_models() -> list[str]:
    """The reference first, then the families; gam-delta once its family is registered."""
    names = [TEXTBOOK, "transformer", "gam", "mamba"]
    return names + (["gam-delta"] if "gam-delta" in MODELS else [])


def pairs_for_length(seq_len: int, pairs: list[int], vocab_size: int) -> list[int]:
    return [p for p in pairs if MAX_PAIR_FRACTION * p <= seq_len and p <= vocab_size // 2 - 1]


def stream_seed(*parts: Any) -> int:
    """A generator seed for one data stream (split, seed, length, ...): a hash, so that
    training, validation and test streams never share a seed."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:7], "little")


@dataclass(frozen=True)
class Protocol:
    """Everything a configuration's numbers depend on besides model, length, lr and seed."""

    vocab_size: int
    d_model: int
    n_layers: int
    steps: int
    tokens_per_step: int
    warmup_fraction: float
    weight_decay: float
    eval_every: int
    val_examples: int
    test_examples: int
    target_accuracy: float
    random_filler: bool
    max_seconds: float | None
    query_power_a: float | None = None  # None: query slots uniform; zoology's power law else
    mix: tuple[tuple[int, int], ...] = ()  # shorter (length, pairs) cases trained beside


PRESETS = {  # every field an option; --quick: the smoke sizes
    "default": Protocol(vocab_size=128, d_model=64, n_layers=2, steps=2000, tokens_per_step=2048,
                        warmup_fraction=0.1, weight_decay=0.1, eval_every=100, val_examples=256,
                        test_examples=1000, target_accuracy=0.99, random_filler=True,
                        max_seconds=None, mix=tuple(DEFAULT_MIX)),
    "quick": Protocol(vocab_size=128, d_model=32, n_layers=2, steps=30, tokens_per_step=256,
                      warmup_fraction=0.1, weight_decay=0.1, eval_every=15, val_examples=32,
                      test_examples=64, target_accuracy=0.99, random_filler=True,
                      max_seconds=None, mix=()),
}


def protocol_key(p: Protocol) -> dict[str, Any]:
    """The protocol as part of a configuration's key: with uniform queries, the fields of the
    protocol before ``query_power_a`` existed, so that finished configurations stay reused.
    ``mix`` is not in it: what a configuration mixes in is its key's own ``mix``."""
    key = asdict(p)
    if key["query_power_a"] is None:
        del key["query_power_a"]
    del key["mix"]
    return key


def mix_for_length(seq_len: int, p: Protocol) -> list[list[Any]]:
    """``[[length, [pairs, ...]], ...]``: the cases of ``p.mix`` shorter than ``seq_len``, one
    entry per length, that a model at ``seq_len`` also trains on."""
    lengths: dict[int, list[int]] = {}
    for m, q in sorted(p.mix):
        if m < seq_len:
            lengths.setdefault(m, []).append(q)
    return [[m, qs] for m, qs in lengths.items()]


def parse_mix_case(text: str) -> tuple[int, int]:
    """``T:P`` -> (T, P) for ``--mix``; a one-line error if malformed or impossible."""
    try:
        t, q = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LENGTH:PAIRS such as 64:4, got {text!r}"
                                         ) from None
    if q < 1 or MAX_PAIR_FRACTION * q > t:
        raise argparse.ArgumentTypeError(f"{text!r}: need pairs >= 1 and {MAX_PAIR_FRACTION} "
                                         f"x pairs <= length")
    return t, q


def batch_size(p: Protocol, seq_len: int, n_pairs: int) -> int:
    # at least 4 sequences per pair count, so that every batch holds the whole mixture
    return max(4 * n_pairs, p.tokens_per_step // seq_len)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]`` -> (name, overrides), a registry name or the textbook's."""
    return parse_model_spec(text, (TEXTBOOK,))


def _family_overrides(name: str, d_model: int) -> dict[str, Any]:
    """GAM's memory has d_model slots (the paper's ratio); Mamba d_state 16 (mamba-ssm's default
    and the paper's) instead of the tiny preset's 4; the tiny preset's 4 heads and expand 2.
    gam-delta's heads are small here (d_model / 4), so its chunk is 32 instead of 64: the same
    function (the chunk only sets how the work is batched) with ~40% less time in the delta
    rule on a CPU (docs/results.md, gam-delta)."""
    return family_overrides(name, {"num_memory_slots": d_model, "d_state": 16,
                                   "delta_chunk_size": 32})


def recall_config(name: str, overrides: dict[str, Any], seq_len: int, p: Protocol):
    """The model config of a configuration: the registry's (library defaults, the tiny
    preset's small sizes) with the recall sizes and ``overrides``, or the textbook's."""
    sizes = dict(d_model=p.d_model, n_layers=p.n_layers, vocab_size=p.vocab_size,
                 max_seq_len=seq_len)
    if name == TEXTBOOK:
        known = {f.name for f in fields(TextbookConfig)} - set(sizes)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for {TEXTBOOK}; expected some of "
                             f"{sorted(known)}")
        return TextbookConfig(**sizes, **overrides)
    return model_config(name, "tiny", dropout=0.0, **sizes,
                        **{**_family_overrides(name, p.d_model), **overrides})


def build_recall_model(name: str, overrides: dict[str, Any], seq_len: int, p: Protocol
                       ) -> torch.nn.Module:
    config = recall_config(name, overrides, seq_len, p)
    if name == TEXTBOOK:
        return TextbookTransformerLM(config)
    return model_from_config(name, config)


def init_label(name: str, config: Any) -> tuple[str, str]:
    """(init, tied) as the tables show them."""
    if name == TEXTBOOK:
        return "textbook N(0,1)", "no"
    return config.init, "yes" if config.tie_embeddings else "no"
