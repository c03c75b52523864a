"""ListOps (Nangia & Bowman 2018) as used by the Long Range Arena (Tay et al. 2021).

A sequence is a prefix expression over the digits 0-9 with four operators, e.g.
``[MAX 2 9 [MIN 4 7 ] 0 ]`` (value 9); the task is to predict its value (10 classes).

Sampling, as published (written from the description and the released generator's
behaviour, not from its code):

- a node at depth ``d`` (the root is at depth 1) is an operator with probability ``OP_P`` =
  0.25 while ``d < max_depth``, else a digit drawn uniformly from 0-9; at ``max_depth`` it is
  always a digit, so a tree has at most ``max_depth`` levels (LRA: 10);
- an operator is drawn uniformly from ``[MIN``, ``[MAX``, ``[MED``, ``[SM`` and takes a number of
  arguments drawn uniformly from 2..``max_args`` (LRA: 10), each an independent node;
- tokens: an operator node is its operator token, its arguments, then ``]``; a digit is one
  token (the published text form's parentheses are dropped, as LRA's input pipeline does);
- a tree is kept only if its token count lies in [``min_len``, ``max_len``] (LRA: 500-2000);
  rejection sampling, so the kept trees follow the published distribution conditioned on the
  length. Duplicates are dropped across all splits (a test sequence never occurs in train).

Values: MIN, MAX; MED = the integer part (floor) of the statistical median (the mean of the
two middle values for an even count); SM = sum modulo 10.

Note on ``OP_P``: the released generator names its constant ``VALUE_P = 0.25`` but returns a
digit when a uniform draw *exceeds* it, i.e. a node is a digit with probability 0.75. That is
what is reproduced here (``op_p=0.25``). The reading "digit with probability 0.25" makes the
branching process explode (mean 4.5 children per node): almost every tree then fills all ten
levels (millions of tokens) and almost none has 500-2000 tokens.

Speed: a tree is grown depth-first and abandoned as soon as it exceeds ``max_len`` tokens.
This does not change which trees are kept (a tree is kept iff its growth never passes
``max_len``) nor their distribution (every tree uses fresh draws of the same stream), it only
avoids finishing trees that are already rejected.

Vocabulary: id 0 is padding, then ``0``-``9`` (ids 1-10), ``[MIN`` ``[MAX`` ``[MED`` ``[SM``
(11-14) and ``]`` (15): ``VOCAB_SIZE`` 16. ``make_dataset`` returns right-padded id arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gam.files import atomic_write, resolve_cache_dir

PAD = "<pad>"
DIGITS = [str(d) for d in range(10)]
OPERATORS = ["[MIN", "[MAX", "[MED", "[SM"]
END = "]"
TOKENS = [PAD, *DIGITS, *OPERATORS, END]
TOKEN_TO_ID = {t: i for i, t in enumerate(TOKENS)}
PAD_ID = 0
DIGIT_IDS = list(range(1, 11))
OP_IDS = list(range(11, 15))
END_ID = 15
VOCAB_SIZE = len(TOKENS)  # 16
NUM_CLASSES = 10
OP_P = 0.25
SPLITS = ("train", "valid", "test")
_CACHE_FORMAT = 1


# ---------------------------------------------------------------------------- tokenizer
def encode(tokens: Sequence[str] | str) -> list[int]:
    """Token strings (a list, or one whitespace-separated string) -> ids. Parentheses, as in
    the published text form, are dropped."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    ids = []
    for t in tokens:
        if t in ("(", ")"):
            continue
        if t not in TOKEN_TO_ID or t == PAD:
            raise ValueError(f"unknown ListOps token {t!r}; expected one of {TOKENS[1:]}")
        ids.append(TOKEN_TO_ID[t])
    return ids


def decode(ids: Sequence[int]) -> str:
    """Ids -> a whitespace-separated expression (padding dropped)."""
    return " ".join(TOKENS[int(i)] for i in ids if int(i) != PAD_ID)


# ---------------------------------------------------------------------------- evaluator
def _apply(op: str, args: list[int]) -> int:
    if not args:
        raise ValueError(f"operator {op} has no arguments")
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s = sorted(args)
        n = len(s)
        return (s[(n - 1) // 2] + s[n // 2]) // 2  # floor of the median: values are >= 0
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def evaluate(expression_tokens: Sequence[str | int] | str) -> int:
    """Value of an expression given as token strings, ids, or one string
    (``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` -> 9). Padding ids (0) are ignored."""
    if isinstance(expression_tokens, str):
        expression_tokens = expression_tokens.split()
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for tok in expression_tokens:
        if not isinstance(tok, str):
            if int(tok) == PAD_ID:
                continue
            tok = TOKENS[int(tok)]
        if tok in ("(", ")"):
            continue
        if result is not None:
            raise ValueError(f"token {tok!r} after the end of the expression")
        if tok in OPERATORS:
            stack.append((tok, []))
        elif tok == END:
            if not stack:
                raise ValueError("unbalanced ']' in the expression")
            op, args = stack.pop()
            value = _apply(op, args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif tok in DIGITS:
            if stack:
                stack[-1][1].append(int(tok))
            else:
                result = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r}")
    if stack or result is None:
        raise ValueError("incomplete expression: an operator is not closed by ']'")
    return result


def tree_stats(ids: Sequence[int]) -> tuple[int, int, int]:
    """(depth, max arguments of an operator, min arguments of an operator) of an id
    sequence; a bare digit has depth 1 and no operator (0, 0)."""
    depth = max_depth = 0
    counts: list[int] = []
    max_args, min_args = 0, 0
    for i in ids:
        i = int(i)
        if i == PAD_ID:
            continue
        if i == END_ID:
            n = counts.pop()
            max_args = max(max_args, n)
            min_args = n if min_args == 0 else min(min_args, n)
            depth -= 1
            continue
        if counts:
            counts[-1] += 1
        max_depth = max(max_depth, depth + 1)
        if i in OP_IDS:
            counts.append(0)
            depth += 1
    return max_depth, max_args, min_args


# ---------------------------------------------------------------------------- sampling
class _TooLong(Exception):
    pass


def sample_tree(rng: random.Random, max_depth: int = 10, max_args: int = 10,
                max_len: int | None = None, op_p: float = OP_P) -> tuple[list[int], int] | None:
    """One tree of the published distribution: (token ids, value), or None if it grew past
    ``max_len`` tokens (it would have been rejected anyway)."""
    out: list[int] = []
    uniform = rng.random
    limit = max_len if max_len is not None else float("inf")

    def grow(depth: int) -> int:
        if depth < max_depth and uniform() < op_p:
            op = int(uniform() * 4)
            n = 2 + int(uniform() * (max_args - 1))
            out.append(OP_IDS[op])
            args = [grow(depth + 1) for _ in range(n)]
            out.append(END_ID)
            if len(out) > limit:
                raise _TooLong
            return _apply(OPERATORS[op], args)
        d = int(uniform() * 10)
        out.append(DIGIT_IDS[d])
        if len(out) > limit:
            raise _TooLong
        return d

    try:
        value = grow(1)
    except _TooLong:
        return None
    return out, value


@dataclass
class ListOpsSplit:
    """Right-padded ids (N, max_len) uint8, real lengths (N,) int32 and labels (N,) int64."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _check(n: int, min_len: int, max_len: int, max_depth: int, max_args: int) -> None:
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}")
    if max_len < min_len:
        raise ValueError(f"max_len {max_len} is smaller than min_len {min_len}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2, got {max_args}")


def generate_split(n: int, min_len: int, max_len: int, rng: random.Random | int,
                   max_depth: int = 10, max_args: int = 10, seen: set[bytes] | None = None,
                   max_attempts: int | None = None) -> ListOpsSplit:
    """``n`` distinct trees with ``min_len <= tokens <= max_len``, by rejection.

    ``seen`` holds the id sequences (as bytes) already used, e.g. by other splits; the new ones
    are added to it. ``rng`` is a ``random.Random`` (advanced in place) or a seed."""
    _check(n, min_len, max_len, max_depth, max_args)
    if not isinstance(rng, random.Random):
        rng = random.Random(int(rng))
    seen = set() if seen is None else seen
    tokens = np.zeros((n, max_len), dtype=np.uint8)
    lengths = np.zeros(n, dtype=np.int32)
    labels = np.zeros(n, dtype=np.int64)
    attempts, k = 0, 0
    while k < n:
        attempts += 1
        if max_attempts is not None and attempts > max_attempts:
            raise RuntimeError(f"only {k} of {n} ListOps trees with {min_len}-{max_len} tokens "
                               f"after {max_attempts} attempts; widen the length range")
        tree = sample_tree(rng, max_depth, max_args, max_len)
        if tree is None or len(tree[0]) < min_len:
            continue
        ids, value = tree
        key = bytes(ids)
        if key in seen:
            continue
        seen.add(key)
        tokens[k, :len(ids)] = ids
        lengths[k] = len(ids)
        labels[k] = value
        k += 1
    return ListOpsSplit(tokens, lengths, labels)


def make_dataset(n_train: int, n_valid: int, n_test: int, min_len: int, max_len: int,
                 seed: int, max_depth: int = 10, max_args: int = 10
                 ) -> dict[str, ListOpsSplit]:
    """Train / valid / test splits from one seeded stream, distinct across splits."""
    rng = random.Random(int(seed))
    seen: set[bytes] = set()
    return {name: generate_split(n, min_len, max_len, rng, max_depth, max_args, seen)
            for name, n in zip(SPLITS, (n_train, n_valid, n_test), strict=True)}


def dataset_key(n_train: int, n_valid: int, n_test: int, min_len: int, max_len: int, seed: int,
                max_depth: int = 10, max_args: int = 10) -> str:
    spec = dict(format=_CACHE_FORMAT, n=[n_train, n_valid, n_test], len=[min_len, max_len],
                seed=seed, max_depth=max_depth, max_args=max_args, op_p=OP_P)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"listops-{min_len}-{max_len}-{n_train}-{n_valid}-{n_test}-s{seed}-{digest}"


def load_or_make_dataset(n_train: int, n_valid: int, n_test: int, min_len: int, max_len: int,
                         seed: int, max_depth: int = 10, max_args: int = 10,
                         cache_dir: str | os.PathLike[str] | None = None
                         ) -> tuple[dict[str, ListOpsSplit], dict[str, float | bool | str]]:
    """``make_dataset`` through an on-disk cache (``<cache>/listops/<key>.npz``, written
    atomically); returns the splits and ``{"cached": bool, "seconds": float, "path": str}``
    (seconds of generation, or of loading on a hit)."""
    key = dataset_key(n_train, n_valid, n_test, min_len, max_len, seed, max_depth, max_args)
    path = Path(resolve_cache_dir(cache_dir)) / "listops" / f"{key}.npz"
    t0 = time.perf_counter()
    if path.is_file():
        with np.load(path) as z:
            splits = {s: ListOpsSplit(z[f"{s}_tokens"], z[f"{s}_lengths"], z[f"{s}_labels"])
                      for s in SPLITS}
        return splits, {"cached": True, "seconds": time.perf_counter() - t0, "path": str(path)}
    splits = make_dataset(n_train, n_valid, n_test, min_len, max_len, seed, max_depth, max_args)
    seconds = time.perf_counter() - t0
    arrays = {f"{s}_{f}": getattr(splits[s], f) for s in SPLITS
              for f in ("tokens", "lengths", "labels")}

    def write(handle) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        handle.write(buf.getvalue())

    atomic_write(path, write)
    return splits, {"cached": False, "seconds": seconds, "path": str(path)}
