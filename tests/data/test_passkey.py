"""Passkey retrieval samples: the key sits at the asked depth, prompts have the asked length,
answers are scored on their digits only, and the training mix is deterministic."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gam.data import Corpus, TokenBlocks, train_tokenizer
from gam.data.passkey import (
    KEY_SENTENCE,
    QUESTION,
    PasskeyGenerator,
    PasskeyMixBlocks,
    digits_of,
    score_answer,
)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. The grass is green and the sky is blue. "
        "What is the key? 0123456789 12345 67890.")


@pytest.fixture(scope="module", params=["bytelevel", "paper"])
def generator(request, tmp_path_factory):
    corpus = Corpus("passkey-test", {"train": [TEXT] * 20, "valid": [TEXT]}, source="test")
    tokenizer = train_tokenizer(corpus, kind=request.param, vocab_size=300,
                                cache_dir=tmp_path_factory.mktemp("cache"))
    return PasskeyGenerator(tokenizer)


@pytest.mark.parametrize("length", [200, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_is_placed_at_the_asked_depth(generator, length, depth):
    sample = generator.sample(length, depth, "48213")
    assert len(sample.ids) == length
    key_ids = generator.tokenizer.encode(KEY_SENTENCE.format(key="48213"),
                                         add_special_tokens=False).ids
    start = sample.key_position
    assert sample.ids[start:start + len(key_ids)] == key_ids
    # within the non-filler tokens of depth * length
    assert abs(start - depth * length) <= generator.overhead()
    assert digits_of(generator.tokenizer.decode(sample.ids)) == "48213" * 2


def test_scoring_reads_the_digits_only():
    assert score_answer(" 48213.", "48213")
    assert score_answer("4 8 2 1 3 is it", "48213")
    assert score_answer("48213", "48213")
    assert not score_answer(" 48212.", "48213")
    assert not score_answer(" the key", "48213")
    assert not score_answer("4821", "48213")


def test_errors_for_bad_requests(generator):
    with pytest.raises(ValueError, match="depth"):
        generator.sample(200, 1.5, "12345")
    with pytest.raises(ValueError, match="5 digits"):
        generator.sample(200, 0.5, "1234")
    with pytest.raises(ValueError, match="at least"):
        generator.sample(10, 0.5, "12345")


def answered_keys(generator, ids):
    """The (stated key, answered key) of every question in ``ids``: the key sentence's key
    before it, and the digits after it."""
    parts = generator.tokenizer.decode(list(ids)).replace(" ", "").split(
        QUESTION.replace(" ", ""))
    stated = [re.findall(r"passkeyis(\d+)\.", part) for part in parts[:-1]]
    answers = [re.match(r"(\d+)\.", part) for part in parts[1:]]
    return [(k[-1] if k else None, a.group(1) if a else None)
            for k, a in zip(stated, answers, strict=True)]


def test_training_mix_is_deterministic_and_ends_with_the_answer(generator):
    ids = np.arange(20_000) % 250
    blocks = TokenBlocks(ids, 128)
    mixed = PasskeyMixBlocks(blocks, 128, generator, 0.25, seed=3)
    assert len(mixed.replaced) == round(0.25 * len(blocks))
    again = PasskeyMixBlocks(blocks, 128, generator, 0.25, seed=3)
    assert mixed.replaced == again.replaced
    i = min(mixed.replaced)
    x, y = mixed[i]
    x2, _ = again[i]
    assert x.shape == y.shape == (128,) and x.equal(x2) and x[1:].equal(y[:-1])
    text = generator.tokenizer.decode(y.tolist())
    assert text.replace(" ", "").endswith("passkeyis" + digits_of(text)[-5:] + ".")
    kept = next(j for j in range(len(blocks)) if j not in mixed.replaced)
    assert mixed[kept][0].equal(blocks[kept][0])
    with pytest.raises(ValueError, match="passkey sample needs"):
        PasskeyMixBlocks(TokenBlocks(ids, 8), 8, generator, 0.5, seed=0)


def test_packed_window_holds_many_samples_all_answered_with_the_windows_key(generator):
    rng = np.random.default_rng(1)
    counts = []
    for n_tokens in [generator.min_window(), 300, 2000]:
        for _ in range(5):
            ids = generator.packed_window(n_tokens, rng)
            assert len(ids) == n_tokens
            pairs = answered_keys(generator, ids)
            assert pairs and all(k is not None and k == a for k, a in pairs)
            assert len({k for k, _ in pairs}) == 1  # one key per window
            counts.append((n_tokens, len(pairs)))
    # short samples dominate: a 2,000-token window holds many (a whole-block sample: one)
    assert min(c for n, c in counts if n == 2000) >= 5
    assert {c for n, c in counts if n == generator.min_window()} == {1}
    with pytest.raises(ValueError, match="passkey sample needs"):
        generator.packed_window(generator.min_window() - 1, rng)
