"""BPE tokenizers: train-split-only training, lossless byte-level round trip, paper specials,
and the on-disk cache."""

from __future__ import annotations

import time

import pytest
from tokenizers import Tokenizer, models

import gam.data.tokenizer as tokenizer_module
from gam.data import Corpus, eot_token_id, train_tokenizer
from gam.data.tokenizer import PAPER_SPECIALS, tokenizer_cache_path

MADE_UP = "zorblaxquint"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold, said the old man to the child.",
    "She sells sea shells by the sea shore every summer morning.",
    "Time flies like an arrow; fruit flies like a banana.",
    "The rain in Spain stays mainly in the plain, they said.",
    "To be or not to be, that is the question of the day.",
    "An apple a day keeps the doctor away, or so we are told.",
]


def toy_corpus(train_extra: str = "", name: str = "toy") -> Corpus:
    """Train text without MADE_UP; valid text that repeats MADE_UP many times."""
    train = [s for s in SENTENCES for _ in range(3)] + ([train_extra] if train_extra else [])
    valid = [f"The {MADE_UP} is here and the {MADE_UP} is there." for _ in range(100)]
    return Corpus(name, {"train": train, "valid": valid}, source="test")


@pytest.mark.parametrize("kind", ["bytelevel", "paper"])
def test_trained_on_train_split_only_by_default(kind):
    corpus = toy_corpus()
    text = f"the {MADE_UP} here"
    train_only = train_tokenizer(corpus, kind=kind, vocab_size=400)
    all_splits = train_tokenizer(corpus, kind=kind, vocab_size=400, on_all_splits=True)
    made_up = " " + MADE_UP if kind == "bytelevel" else MADE_UP
    assert len(train_only.encode(made_up).ids) >= 3, "word only in valid must not be merged"
    assert len(all_splits.encode(made_up).ids) == 1, "with on_all_splits it becomes one token"
    assert len(train_only.encode(text).ids) > len(all_splits.encode(text).ids)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces  \n\n\tTabs\tand\r\nCRLF\n",
        "naïve café — 日本語のテキスト, emoji 😀🎉, Ελληνικά, עברית",
        "zorblaxquint never seen before ‽ \x00 control \x7f chars",
        "",
    ],
)
def test_bytelevel_round_trip_is_lossless(text):
    tokenizer = train_tokenizer(toy_corpus(), kind="bytelevel", vocab_size=300)
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_to_id("[UNK]") is None  # nothing is ever unknown at byte level


def test_bytelevel_eot_token():
    tokenizer = train_tokenizer(toy_corpus(), kind="bytelevel", vocab_size=300)
    assert eot_token_id(tokenizer) == tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.encode("a<|endoftext|>b").ids[1] == eot_token_id(tokenizer)
    assert tokenizer.get_vocab_size() <= 300


def test_paper_kind_has_official_specials_and_is_lossy():
    tokenizer = train_tokenizer(toy_corpus(), kind="paper", vocab_size=300)
    assert [tokenizer.token_to_id(t) for t in PAPER_SPECIALS] == [0, 1, 2, 3]
    assert eot_token_id(tokenizer) == tokenizer.token_to_id("[EOS]") == 3
    assert tokenizer.encode("日").ids == [tokenizer.token_to_id("[UNK]")]  # unseen character
    decoded = tokenizer.decode(tokenizer.encode("The  quick\nfox").ids)
    assert decoded != "The  quick\nfox"  # whitespace is not preserved
    assert decoded.split() == ["The", "quick", "fox"]


def test_eot_token_id_requires_a_separator():
    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        eot_token_id(bare)


def test_bad_arguments_rejected():
    corpus = toy_corpus()
    with pytest.raises(ValueError, match="'wordpiece'"):
        train_tokenizer(corpus, kind="wordpiece")
    with pytest.raises(ValueError, match=">= 257"):
        train_tokenizer(corpus, kind="bytelevel", vocab_size=100)
    with pytest.raises(ValueError, match="<= 2,097,152"):  # the BPE trainer would abort
        train_tokenizer(corpus, kind="bytelevel", vocab_size=100_000_000)


def test_second_call_loads_from_cache_without_training(monkeypatch, cache_dir):
    corpus = toy_corpus()
    first = train_tokenizer(corpus, vocab_size=350)
    path = tokenizer_cache_path(corpus, "bytelevel", 350, False)
    assert path.is_file() and cache_dir in path.parents

    def must_not_train(*args, **kwargs):
        raise AssertionError("tokenizer was retrained despite a cache hit")

    monkeypatch.setattr(tokenizer_module, "_train_new", must_not_train)
    started = time.perf_counter()
    second = train_tokenizer(corpus, vocab_size=350)
    assert time.perf_counter() - started < 1.0
    assert second.to_str() == first.to_str()
    assert list(cache_dir.rglob("*.tmp")) == []  # atomic write left no temporary file


def test_cache_invalidated_when_training_text_changes(monkeypatch, tmp_path):
    calls: list[str] = []
    real_train = tokenizer_module._train_new

    def counting_train(corpus, *args, **kwargs):
        calls.append(corpus.name)
        return real_train(corpus, *args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "_train_new", counting_train)
    train_tokenizer(toy_corpus(), vocab_size=300, cache_dir=tmp_path)
    train_tokenizer(toy_corpus(), vocab_size=300, cache_dir=tmp_path)
    assert len(calls) == 1
    # valid text does not feed a train-only tokenizer: still a cache hit
    changed_valid = toy_corpus()
    changed_valid.splits["valid"] = ["something else entirely"]
    train_tokenizer(changed_valid, vocab_size=300, cache_dir=tmp_path)
    assert len(calls) == 1
    # edited train text, other vocab size, other kind, on_all_splits: each retrains
    train_tokenizer(toy_corpus(train_extra="one more line"), vocab_size=300, cache_dir=tmp_path)
    train_tokenizer(toy_corpus(), vocab_size=301, cache_dir=tmp_path)
    train_tokenizer(toy_corpus(), kind="paper", vocab_size=300, cache_dir=tmp_path)
    train_tokenizer(toy_corpus(), vocab_size=300, on_all_splits=True, cache_dir=tmp_path)
    assert len(calls) == 5
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.json"))) == 5


def test_corrupt_cache_entry_is_rebuilt(cache_dir):
    corpus = toy_corpus()
    path = tokenizer_cache_path(corpus, "bytelevel", 300, False)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    assert tokenizer.decode(tokenizer.encode("fox").ids) == "fox"
    assert Tokenizer.from_file(str(path)).to_str() == tokenizer.to_str()
