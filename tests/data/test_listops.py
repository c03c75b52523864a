import random

import numpy as np
import pytest

from gam.data import listops
from gam.data.listops import (
    END_ID,
    OP_IDS,
    PAD_ID,
    VOCAB_SIZE,
    decode,
    encode,
    evaluate,
    generate_split,
    load_or_make_dataset,
    make_dataset,
    sample_tree,
    tree_stats,
)


@pytest.mark.parametrize("expr, value", [
    ("7", 7),
    ("[MIN 4 7 2 9 ]", 2),
    ("[MAX 4 7 2 9 ]", 9),
    ("[SM 4 7 2 9 ]", 2),          # 22 mod 10
    ("[SM 5 5 ]", 0),
    ("[MED 1 9 4 ]", 4),           # odd count: the middle value
    ("[MED 1 2 ]", 1),             # even count: floor(1.5)
    ("[MED 3 8 1 6 ]", 4),         # sorted 1 3 6 8 -> floor(4.5)
    ("[MED 2 4 ]", 3),             # even count with an integer median
    ("[MED 9 9 0 0 ]", 4),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN [MAX 1 2 ] [SM 9 9 ] [MED 0 5 6 8 ] ]", 2),  # MAX 2, SM 8, MED 5
    ("[SM [SM 9 9 ] [MAX [MIN 3 4 ] 1 ] 0 ]", 1),        # 8 + 3 = 11 -> 1
    ("( [MAX 2 ( [MIN 4 7 ] ) 0 ] )", 4),                # the published text form
])
def test_evaluate_hand_made(expr, value):
    assert evaluate(expr) == value
    assert evaluate(encode(expr)) == value          # ids
    assert evaluate(expr.split()) == value          # token strings


def test_evaluate_rejects_malformed():
    for bad in ("[MAX 1 2", "1 2", "[MIN ]", "]", "[FOO 1 ]"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_vocab_roundtrip():
    assert VOCAB_SIZE == 16 and PAD_ID == 0 and END_ID == 15
    expr = "[MIN [MAX 1 2 ] [SM 9 9 ] [MED 0 5 6 8 ] ]"
    ids = encode(expr)
    assert min(ids) >= 1 and max(ids) < VOCAB_SIZE
    assert decode(ids + [0, 0]) == expr
    with pytest.raises(ValueError, match="unknown"):
        encode("[FIRST 1 2 ]")


def test_tree_stats():
    assert tree_stats(encode("7")) == (1, 0, 0)
    assert tree_stats(encode("[MAX 2 9 [MIN 4 7 ] 0 ]")) == (3, 4, 2)


def test_generated_samples_respect_bounds_and_labels():
    split = generate_split(200, 40, 120, random.Random(3), max_depth=6, max_args=5)
    assert split.tokens.shape == (200, 120) and split.tokens.dtype == np.uint8
    assert split.lengths.min() >= 40 and split.lengths.max() <= 120
    for row, n, label in zip(split.tokens, split.lengths, split.labels, strict=True):
        ids = row[:n].tolist()
        assert (row[n:] == PAD_ID).all() and PAD_ID not in ids
        depth, max_args, min_args = tree_stats(ids)
        assert depth <= 6 and 2 <= min_args and max_args <= 5
        assert ids[0] in OP_IDS and ids[-1] == END_ID
        assert evaluate(ids) == label


def test_lra_settings_depth_and_arguments():
    rng = random.Random(0)
    depths, args = [], []
    while len(depths) < 30:
        tree = sample_tree(rng, max_depth=10, max_args=10, max_len=2000)
        if tree is None or len(tree[0]) < 500:
            continue
        d, hi, lo = tree_stats(tree[0])
        depths.append(d)
        args += [hi, lo]
        assert evaluate(tree[0]) == tree[1]
    assert max(depths) <= 10 and min(args) >= 2 and max(args) <= 10
    assert max(args) == 10  # the upper bound of the argument count is reached


def test_early_abort_only_drops_long_trees():
    # Same stream, with and without the length cap: a tree that stays within the cap is the
    # same tree; one that passes it is dropped (the cap only stops growing it).
    for seed in range(50):
        full = sample_tree(random.Random(seed), max_len=None)
        capped = sample_tree(random.Random(seed), max_len=300)
        if len(full[0]) <= 300:
            assert capped == full
        else:
            assert capped is None


def test_deterministic_by_seed_and_distinct_across_splits():
    a = make_dataset(300, 50, 50, 20, 80, seed=5, max_depth=6)
    b = make_dataset(300, 50, 50, 20, 80, seed=5, max_depth=6)
    c = make_dataset(300, 50, 50, 20, 80, seed=6, max_depth=6)
    for s in listops.SPLITS:
        assert np.array_equal(a[s].tokens, b[s].tokens)
        assert np.array_equal(a[s].labels, b[s].labels)
    assert not np.array_equal(a["train"].tokens, c["train"].tokens)
    # short lengths make duplicates likely: they must all be dropped, across splits too
    rows = [r.tobytes() for s in listops.SPLITS for r in a[s].tokens]
    assert len(rows) == len(set(rows)) == 400


def test_label_distribution_not_degenerate():
    split = generate_split(600, 100, 500, random.Random(1))
    counts = np.bincount(split.labels, minlength=10)
    assert (counts > 0).all()
    assert counts.max() / counts.sum() < 0.35


def test_validation_and_cache(tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        generate_split(1, 50, 10, 0)
    with pytest.raises(ValueError, match="max_args"):
        generate_split(1, 5, 10, 0, max_args=1)
    first, info = load_or_make_dataset(20, 5, 5, 20, 60, seed=1, cache_dir=tmp_path)
    assert info["cached"] is False
    second, info = load_or_make_dataset(20, 5, 5, 20, 60, seed=1, cache_dir=tmp_path)
    assert info["cached"] is True
    for s in listops.SPLITS:
        assert np.array_equal(first[s].tokens, second[s].tokens)
        assert np.array_equal(first[s].labels, second[s].labels)
    assert not list(tmp_path.rglob("*.tmp"))
