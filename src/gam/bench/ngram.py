"""Count-based baselines for a token stream: what a model must beat to have learned anything.

The unigram model predicts every token from its training frequency; the bigram model
interpolates the count of (previous, next) with the unigram prior (additive smoothing with
``alpha * V`` pseudo-counts spread by the unigram distribution). Both are scored on the
validation stream exactly as the models are (every token but the first is a target), so a
language model whose validation perplexity equals the unigram figure has learned token
frequencies and nothing of context.
"""

from __future__ import annotations

import numpy as np


def ngram_baselines(train_ids: np.ndarray, valid_ids: np.ndarray, vocab_size: int,
                    alpha: float = 0.1) -> dict[str, float]:
    """Validation cross-entropy (nats) and perplexity of a unigram and a smoothed bigram model
    counted on ``train_ids``."""
    train = np.asarray(train_ids, dtype=np.int64)
    valid = np.asarray(valid_ids, dtype=np.int64)
    if len(train) < 2 or len(valid) < 2:
        raise ValueError(f"need at least 2 tokens per split, got train {len(train)}, "
                         f"valid {len(valid)}")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 0.5
    unigram = counts / counts.sum()
    uni_ce = float(-np.log(unigram[valid[1:]]).mean())

    pair_codes, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    prev_counts = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)
    queries = valid[:-1] * vocab_size + valid[1:]
    pos = np.searchsorted(pair_codes, queries).clip(max=len(pair_codes) - 1)
    seen = np.where(pair_codes[pos] == queries, pair_counts[pos], 0).astype(np.float64)
    prob = (seen + alpha * vocab_size * unigram[valid[1:]]) / (prev_counts[valid[:-1]]
                                                                + alpha * vocab_size)
    bi_ce = float(-np.log(prob).mean())
    return {"unigram_loss": uni_ce, "unigram_ppl": float(np.exp(uni_ce)),
            "bigram_loss": bi_ce, "bigram_ppl": float(np.exp(bi_ce)), "bigram_alpha": alpha}
