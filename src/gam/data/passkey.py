"""Passkey retrieval in filler text (Mohtashami & Jaggi 2023, "Landmark Attention"): can a
model read back a number it saw once, far back in its context?

A sample is, in tokens::

    filler[:a]  KEY_SENTENCE  filler[a:a+b]  QUESTION  | ANSWER

- the filler is the paper's repeated text (:data:`FILLER`: "The grass is green. The sky is
  blue. ..."), the same for every corpus, cut at token granularity;
- ``KEY_SENTENCE`` states a random 5-digit key once ("The pass key is 12345. Remember it. 12345
  is the pass key.");
- ``QUESTION`` ends the prompt ("What is the pass key? The pass key is") and ``ANSWER`` is the
  key again (" 12345.").

The prompt has exactly ``length`` tokens and the key sentence starts at token
``round(depth * (length - len(key sentence) - len(question)))``: depth 0 puts it first, depth
1 right before the question. Every piece is encoded on its own and the ids concatenated (each
piece starts with a space, so for byte-level BPE this is how the joined text encodes), the same
for training and evaluation.

Scoring (:func:`score_answer`) looks at the digits only: the generated text's digit
characters, the first five of them, must be the key (spaces, punctuation or words around them
do not matter).

Training (:class:`PasskeyMixBlocks`): a fixed share of the training blocks is replaced by
passkey samples packed back to back (each prompt + answer, its key at a uniformly random
depth), chosen and drawn from ``(seed, block index)`` alone, so the data stream stays a pure
function of the run's seed and a resumed run sees the same samples. Most samples are short
(:data:`SHORT_SHARE` of them at most :data:`SHORT_LIMIT` tokens), the rest reach up to the
whole block, both log-uniform in length: the short ones put many copies in every optimizer
step, which a small model needs to learn the copy at all (docs/results.md "Long context"),
and the long ones teach the distance. The samples of one block share one key, so an earlier
sample's key is never a wrong answer to copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back"
          " again.")
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."
KEY_DIGITS = 5
SHORT_SHARE = 0.9  # of the packed training samples, the share drawn at most SHORT_LIMIT long
SHORT_LIMIT = 128  # tokens
_MIX_STREAM = 0x9A55  # the seed stream that picks the replaced blocks


@dataclass(frozen=True)
class PasskeySample:
    """One prompt: ``ids`` (exactly the asked length, ending with the question), the
    ``answer_ids`` that follow it, the ``key``, the ``depth`` asked and the token position
    ``key_position`` where the key sentence starts."""

    ids: list[int]
    answer_ids: list[int]
    key: str
    depth: float
    key_position: int


class PasskeyGenerator:
    """Builds passkey prompts with a tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._filler = self._encode(FILLER)
        self._question = self._encode(QUESTION)
        if not self._filler or not self._question:
            raise ValueError("the tokenizer encodes the passkey filler or question to nothing")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def overhead(self) -> int:
        """An upper bound, over all keys, of the tokens of a prompt that are not filler (key
        sentence + question): a key may take up to one token per digit and its space."""
        return (len(self._encode(KEY_SENTENCE.format(key="0" * KEY_DIGITS)))
                + 2 * (KEY_DIGITS + 1) + len(self._question))

    def filler(self, n: int, offset: int = 0) -> list[int]:
        """``n`` tokens of the repeated filler, from token ``offset`` of its stream."""
        unit = self._filler
        reps = -(-(offset + n) // len(unit))
        return (unit * reps)[offset:offset + n]

    def sample(self, length: int, depth: float, key: str) -> PasskeySample:
        """A prompt of exactly ``length`` tokens with ``key`` at ``depth`` (0..1)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth must be in [0, 1], got {depth!r}")
        if len(key) != KEY_DIGITS or not key.isdigit():
            raise ValueError(f"a pass key is {KEY_DIGITS} digits, got {key!r}")
        key_ids = self._encode(KEY_SENTENCE.format(key=key))
        room = length - len(key_ids) - len(self._question)
        if room < 0:
            raise ValueError(f"a passkey prompt needs at least {len(key_ids) + len(self._question)}"
                             f" tokens with this tokenizer, asked for {length}")
        before = round(depth * room)
        ids = (self.filler(before) + key_ids + self.filler(room - before, before)
               + self._question)
        return PasskeySample(ids, self._encode(ANSWER.format(key=key)), key, depth, before)

    def answer_tokens(self, key: str | None = None) -> int:
        """Tokens of the answer that follows the question (no key: an upper bound)."""
        if key is None:
            return len(self._encode(ANSWER.format(key="0" * KEY_DIGITS))) + KEY_DIGITS + 1
        return len(self._encode(ANSWER.format(key=key)))

    def random_key(self, rng: np.random.Generator) -> str:
        return str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS)))

    def training_window(self, n_tokens: int, rng: np.random.Generator,
                        key: str | None = None) -> list[int]:
        """Prompt + answer, exactly ``n_tokens`` ids, random depth and key (unless given)."""
        key = key if key is not None else self.random_key(rng)
        sample = self.sample(n_tokens - self.answer_tokens(key), float(rng.random()), key)
        return sample.ids + sample.answer_ids

    def min_window(self) -> int:
        """The fewest tokens a training window (prompt + answer) may have, for every key."""
        return self.overhead() + self.answer_tokens()

    def packed_window(self, n_tokens: int, rng: np.random.Generator) -> list[int]:
        """Training windows back to back, exactly ``n_tokens`` ids, all with one random key:
        each length drawn log-uniformly between :meth:`min_window` and :data:`SHORT_LIMIT` (a
        share :data:`SHORT_SHARE` of them) or the room left; the last window takes the rest.
        One key per window, so that an earlier sample's key is never a wrong answer to copy
        (docs/results.md "Long context")."""
        low = self.min_window()
        if n_tokens < low:
            raise ValueError(f"a passkey sample needs {low} tokens with this tokenizer, asked "
                             f"for a window of {n_tokens}")
        key = self.random_key(rng)
        ids: list[int] = []
        while len(ids) < n_tokens:
            room = n_tokens - len(ids)
            high = min(SHORT_LIMIT, room) if rng.random() < SHORT_SHARE else room
            length = int(round(np.exp(rng.uniform(np.log(low), np.log(max(low, high))))))
            if room - length < low:
                length = room
            ids += self.training_window(length, rng, key)
        return ids


def digits_of(text: str) -> str:
    return re.sub(r"[^0-9]", "", text)


def score_answer(generated_text: str, key: str) -> bool:
    """Is the key the first :data:`KEY_DIGITS` digit characters of ``generated_text``? Only
    the digits count."""
    return digits_of(generated_text)[:KEY_DIGITS] == key


class PasskeyMixBlocks(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Training blocks with a share ``fraction`` of them replaced by passkey samples.

    ``round(fraction * len(blocks))`` block indices, drawn once from ``seed``, hold passkey
    samples packed into ``block_size + 1`` tokens (:meth:`PasskeyGenerator.packed_window`;
    input: the first ``block_size``, target: the last ``block_size``) drawn from ``(seed,
    index)``; the others are ``blocks``' own."""

    def __init__(self, blocks: Dataset, block_size: int, generator: PasskeyGenerator,
                 fraction: float, seed: int) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"passkey mix must be in [0, 1), got {fraction!r}")
        need = generator.min_window()
        if fraction and block_size + 1 < need:
            raise ValueError(f"a passkey sample needs {need} tokens with this tokenizer, more "
                             f"than a block of {block_size} + 1: use a longer --seq-len or "
                             f"--passkey-mix 0")
        self.blocks = blocks
        self.block_size = block_size
        self.generator = generator
        self.seed = int(seed)
        n = len(blocks)
        chosen = np.random.default_rng([self.seed, _MIX_STREAM]).choice(
            n, size=round(fraction * n), replace=False)
        self.replaced = frozenset(int(i) for i in chosen)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += len(self)
        if index not in self.replaced:
            return self.blocks[index]
        rng = np.random.default_rng([self.seed, _MIX_STREAM, index])
        window = torch.tensor(self.generator.packed_window(self.block_size + 1, rng),
                              dtype=torch.long)
        return window[:-1].clone(), window[1:].clone()
