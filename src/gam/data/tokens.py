"""Token ids of a corpus: one flat stream per split, cached on disk as memory-mapped arrays.

Stream layout (what a language model is trained and evaluated on):

* ``row_kind="line"`` corpora (WikiText-2, Austen, ``text:``): the split is one continuous
  text. Every row is encoded with its newline (blank rows are a bare ``"\\n"``), and the ids are
  concatenated with **no end-of-text token**: this is the usual WikiText protocol (the split is
  a single stream cut into blocks), and with the byte-level tokenizer the stream decodes back
  to the exact text. Austen's novels are likewise one stream, joined by their blank line as in
  the source file. A tokenizer that drops whitespace (``"paper"``) simply yields no ids for
  blank rows.
* ``row_kind="document"`` corpora (TinyStories): each story is encoded and followed by the
  end-of-text id (``<|endoftext|>`` / ``[EOS]``), as in the TinyStories files, so the model
  learns where stories end and never silently runs one story into the next.

The cache key covers the corpus name, split, row kind, the split's fingerprint and a hash of
the tokenizer JSON: editing the source text or retraining the tokenizer invalidates it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from gam.data.corpus import Corpus
from gam.data.tokenizer import eot_token_id, tokenizer_hash
from gam.files import atomic_write, resolve_cache_dir, safe_name

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the stream layout changes
_ENCODE_CHUNK = 8192  # rows per encode_batch call: keeps memory flat on very large splits


def ids_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab <= 65,535, half the memory), else ``int32``."""
    return np.dtype(np.uint16) if vocab_size <= 65_535 else np.dtype(np.int32)


def encode_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str] | None = None,
    splits: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Token ids of every split (or only ``splits``) of ``corpus``, as flat 1-D arrays.

    Arrays come from the on-disk cache as read-only ``np.memmap`` views (a second run starts in
    well under a second); a cache miss encodes with ``encode_batch`` (multi-threaded) and writes
    the cache atomically. Cache root: ``cache_dir``, else ``$GAM_CACHE_DIR``, else
    ``~/.cache/gam``; files live under ``tokens/<corpus>/``.
    """
    tokenizer = _plain_tokenizer(tokenizer)
    wanted = list(corpus.splits) if splits is None else list(splits)
    for split in wanted:
        corpus.rows(split)  # raises KeyError naming the available splits
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = ids_dtype(vocab_size)
    eot = eot_token_id(tokenizer) if corpus.row_kind == "document" else None
    tok_hash = tokenizer_hash(tokenizer)
    root = resolve_cache_dir(cache_dir)

    result: dict[str, np.ndarray] = {}
    for split in wanted:
        path = token_cache_path(corpus, split, tok_hash, root)
        cached = _load_cached(path, dtype, vocab_size)
        if cached is not None:
            result[split] = cached
            continue
        started = time.perf_counter()
        ids = _encode_texts(tokenizer, corpus.texts(split), eot, dtype)
        atomic_write(path, lambda handle, ids=ids: np.save(handle, ids, allow_pickle=False))
        logger.info(
            "encoded %s/%s: %d tokens in %.1f s -> %s",
            corpus.name,
            split,
            ids.size,
            time.perf_counter() - started,
            path,
        )
        loaded = _load_cached(path, dtype, vocab_size)
        result[split] = loaded if loaded is not None else ids
    return result


def token_cache_path(
    corpus: Corpus, split: str, tok_hash: str, cache_root: str | os.PathLike[str]
) -> Path:
    """Where the ids of ``split`` encoded by the tokenizer with hash ``tok_hash`` are cached."""
    key_fields = {
        "format": _CACHE_FORMAT,
        "corpus": corpus.name,
        "split": split,
        "row_kind": corpus.row_kind,
        "fingerprint": corpus.fingerprint(split),
        "tokenizer": tok_hash,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_root) / "tokens" / safe_name(corpus.name) / f"{split}-{key}.npy"


def _plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A tokenizer without padding/truncation (which would corrupt a flat stream).

    The caller's object is left untouched: a copy is made only when those are switched on.
    """
    if tokenizer.padding is None and tokenizer.truncation is None:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def _encode_texts(
    tokenizer: Tokenizer, texts: list[str], eot: int | None, dtype: np.dtype
) -> np.ndarray:
    # encode_batch_fast skips offset tracking (tokenizers >= 0.20); same ids, less work
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        encodings = encode(texts[start : start + _ENCODE_CHUNK], add_special_tokens=False)
        id_lists: list[list[int]] = [enc.ids for enc in encodings]
        if eot is not None:
            id_lists = [ids + [eot] for ids in id_lists]
        count = sum(len(ids) for ids in id_lists)
        pieces.append(
            np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype, count=count)
        )
    if not pieces:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(pieces)


def _load_cached(path: Path, dtype: np.dtype, vocab_size: int) -> np.ndarray | None:
    """The cached ids as a read-only memmap, or None if absent, unreadable, of another
    dtype or holding ids outside the vocabulary (then they are re-encoded)."""
    if not path.is_file():
        return None
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        # numpy cannot memory-map a zero-length array; read those (tiny) files normally
        try:
            ids = np.load(path, allow_pickle=False)
        except Exception:
            logger.warning("ignoring unreadable token cache %s (%s)", path, exc)
            return None
    except Exception as exc:
        logger.warning("ignoring unreadable token cache %s (%s)", path, exc)
        return None
    if ids.dtype != dtype or ids.ndim != 1:
        logger.warning(
            "ignoring token cache %s with dtype %s, shape %s", path, ids.dtype, ids.shape
        )
        return None
    if ids.size and int(ids.max()) >= vocab_size:
        logger.warning(
            "ignoring token cache %s: it holds id %d, outside the tokenizer's %d tokens "
            "(a damaged file); encoding again",
            path,
            int(ids.max()),
            vocab_size,
        )
        return None
    return ids
