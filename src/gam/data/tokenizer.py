"""Byte-pair-encoding tokenizers trained on a corpus, cached on disk.

Two kinds:

* ``"bytelevel"`` (default): GPT-2 style byte-level BPE. Every string, any Unicode included,
  encodes to ids and decodes back to exactly the same string, so perplexities and generated
  samples are never distorted by the tokenizer. Special token: ``<|endoftext|>``.
* ``"paper"``: what the official GAM code used -- BPE with a ``Whitespace`` pre-tokenizer and
  specials ``[UNK] [PAD] [SOS] [EOS]`` (``[UNK]`` for unknown characters). Whitespace and
  newlines are dropped, so decoding is lossy (tokens are joined with spaces).

The tokenizer is trained on the ``train`` split only by default: training it on the evaluation
text (as the official code did, ``on_all_splits=True``) leaks information about valid/test into
the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gam.data.corpus import Corpus
from gam.files import atomic_write, resolve_cache_dir, safe_name

logger = logging.getLogger(__name__)

TOKENIZER_KINDS = ("bytelevel", "paper")
BYTELEVEL_EOT = "<|endoftext|>"
PAPER_SPECIALS = ("[UNK]", "[PAD]", "[SOS]", "[EOS]")
PAPER_EOT = "[EOS]"

_CACHE_FORMAT = 1  # bump when the way tokenizers are built changes, to retire old cache entries
_TRAIN_BATCH = 1000
# the largest vocabulary accepted: the BPE trainer reserves memory for the whole vocabulary up
# front (a huge size aborts the process), and no corpus here has that many useful merges
MAX_VOCAB_SIZE = 2**21


def train_tokenizer(
    corpus: Corpus,
    kind: str = "bytelevel",
    vocab_size: int = 10000,
    on_all_splits: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Train (or load from the cache) a BPE tokenizer on ``corpus``.

    Args:
        corpus: the text; only its ``train`` split is used unless ``on_all_splits``.
        kind: ``"bytelevel"`` (lossless) or ``"paper"`` (as the official code); see the module
            docstring.
        vocab_size: target vocabulary size including special tokens (a small corpus may yield
            fewer tokens).
        on_all_splits: also train on valid/test, reproducing the official code (leaks
            evaluation text into the vocabulary; off by default).
        cache_dir: cache root (default ``$GAM_CACHE_DIR`` or ``~/.cache/gam``). The tokenizer
            is stored as ``tokenizers/<key>/tokenizer.json``, keyed by the corpus name, kind,
            vocabulary size, ``on_all_splits`` and the fingerprints of the training text, so an
            edited corpus or a different row cut trains a new one.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    minimum = _min_vocab_size(kind)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not minimum <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size for a {kind!r} tokenizer must be an int >= {minimum} and <= "
            f"{MAX_VOCAB_SIZE:,}, got {vocab_size!r}"
        )
    splits = list(corpus.splits) if on_all_splits else ["train"]
    path = tokenizer_cache_path(corpus, kind, vocab_size, on_all_splits, cache_dir)
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # a corrupt entry is rebuilt, not fatal
            logger.warning("ignoring unreadable cached tokenizer %s (%s)", path, exc)
        else:
            logger.info("loaded cached tokenizer %s", path)
            return tokenizer

    started = time.perf_counter()
    tokenizer = _train_new(corpus, kind, vocab_size, splits)
    text = tokenizer.to_str()
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    logger.info(
        "trained %s tokenizer (vocab %d) on %s splits %s in %.1f s -> %s",
        kind,
        tokenizer.get_vocab_size(),
        corpus.name,
        splits,
        time.perf_counter() - started,
        path,
    )
    return tokenizer


def tokenizer_cache_path(
    corpus: Corpus,
    kind: str,
    vocab_size: int,
    on_all_splits: bool,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Where :func:`train_tokenizer` stores the tokenizer for these arguments."""
    splits = list(corpus.splits) if on_all_splits else ["train"]
    key_fields = {
        "format": _CACHE_FORMAT,
        "corpus": corpus.name,
        "kind": kind,
        "vocab_size": vocab_size,
        "on_all_splits": on_all_splits,
        "fingerprints": {split: corpus.fingerprint(split) for split in splits},
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    scope = "all" if on_all_splits else "train"
    folder = f"{safe_name(corpus.name)}-{kind}-{vocab_size}-{scope}-{key}"
    return resolve_cache_dir(cache_dir) / "tokenizers" / folder / "tokenizer.json"


def eot_token_id(tokenizer: Tokenizer) -> int:
    """Id of the document separator: ``<|endoftext|>`` (bytelevel) or ``[EOS]`` (paper)."""
    for token in (BYTELEVEL_EOT, PAPER_EOT):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"tokenizer has no end-of-text token: expected {BYTELEVEL_EOT!r} or {PAPER_EOT!r} in "
        "its vocabulary (train it with gam.data.train_tokenizer)"
    )


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's JSON, identifying it in token-id cache keys."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def _min_vocab_size(kind: str) -> int:
    if kind == "bytelevel":
        return len(pre_tokenizers.ByteLevel.alphabet()) + 1  # all 256 bytes + <|endoftext|>
    return len(PAPER_SPECIALS) + 1


def _train_new(corpus: Corpus, kind: str, vocab_size: int, splits: list[str]) -> Tokenizer:
    """Build and train a fresh tokenizer on ``splits`` (a separate function so tests can check
    that a cache hit does not call it)."""
    if kind == "bytelevel":
        tokenizer = Tokenizer(models.BPE())
        # add_prefix_space=False: a leading space would be invented, breaking decode(encode(s)).
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BYTELEVEL_EOT],
            # every byte is in the vocabulary, so nothing is ever unknown
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(PAPER_SPECIALS), show_progress=False
        )
    texts = [text for split in splits for text in corpus.texts(split)]
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))
    return tokenizer


def _batches(texts: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(texts), _TRAIN_BATCH):
        yield texts[start : start + _TRAIN_BATCH]
