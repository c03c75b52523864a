"""Count baselines: checked against a direct computation on a small stream."""

import math

import numpy as np
import pytest

from gam.bench.ngram import ngram_baselines


def test_ngram_baselines_match_direct_computation():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 7, 500)
    valid = rng.integers(0, 7, 80)
    V, alpha = 9, 0.1  # two ids never seen
    got = ngram_baselines(train, valid, V, alpha)
    counts = np.bincount(train, minlength=V) + 0.5
    p = counts / counts.sum()
    uni = -np.mean([math.log(p[b]) for b in valid[1:]])
    pairs = {}
    for a, b in zip(train[:-1], train[1:], strict=True):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    prev = np.bincount(train[:-1], minlength=V)
    bi = -np.mean([math.log((pairs.get((a, b), 0) + alpha * V * p[b]) / (prev[a] + alpha * V))
                   for a, b in zip(valid[:-1], valid[1:], strict=True)])
    assert got["unigram_loss"] == pytest.approx(uni, rel=1e-12)
    assert got["bigram_loss"] == pytest.approx(bi, rel=1e-12)
    assert got["unigram_ppl"] == pytest.approx(math.exp(uni))


def test_bigram_beats_unigram_on_a_predictable_stream():
    train = np.tile(np.arange(5), 200)
    got = ngram_baselines(train, np.tile(np.arange(5), 10), 5)
    assert got["bigram_ppl"] < 1.5 < got["unigram_ppl"]
