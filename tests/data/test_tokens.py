"""Token id streams: layout (EOT placement), memmap cache, dtype, invalidation."""

from __future__ import annotations

import time

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import gam.data.tokens as tokens_module
from gam.data import (
    Corpus,
    TokenBlocks,
    encode_corpus,
    eot_token_id,
    load_corpus,
    train_tokenizer,
)
from gam.data.tokenizer import tokenizer_hash
from gam.data.tokens import ids_dtype, token_cache_path

TRAIN_ROWS = [" = Title = ", "", " The cat sat on the mat . ", " Dogs bark ; cats don't . "]
LINES = {
    "train": TRAIN_ROWS * 5,
    "valid": ["", " The dog sat on the cat . ", " naïve café 😀 "],
}
STORIES = {
    "train": ["Tom had a ball.\nHe was happy.", "Sue saw a bird.", "The end came soon."] * 4,
    "valid": ["A cat ran.", "The sun set."],
}


@pytest.fixture
def line_corpus() -> Corpus:
    return Corpus("lines", {k: list(v) for k, v in LINES.items()}, source="test")


@pytest.fixture
def story_corpus() -> Corpus:
    return Corpus(
        "stories", {k: list(v) for k, v in STORIES.items()}, source="test", row_kind="document"
    )


def test_line_corpus_stream_is_the_text_without_eot(line_corpus):
    tokenizer = train_tokenizer(line_corpus, vocab_size=300)
    ids = encode_corpus(line_corpus, tokenizer)
    assert set(ids) == {"train", "valid"}
    for split, rows in line_corpus.splits.items():
        assert isinstance(ids[split], np.memmap)
        assert ids[split].dtype == np.uint16 and ids[split].ndim == 1
        assert tokenizer.decode(ids[split].tolist()) == "\n".join(rows) + "\n"
        assert eot_token_id(tokenizer) not in ids[split]


def test_document_corpus_has_eot_after_every_story(story_corpus):
    tokenizer = train_tokenizer(story_corpus, vocab_size=300)
    eot = eot_token_id(tokenizer)
    ids = encode_corpus(story_corpus, tokenizer)
    for split, stories in story_corpus.splits.items():
        stream = ids[split].tolist()
        assert stream.count(eot) == len(stories) and stream[-1] == eot
        pieces, current = [], []
        for token in stream:
            if token == eot:
                pieces.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        assert pieces == stories


def test_paper_tokenizer_skips_blank_rows(line_corpus):
    tokenizer = train_tokenizer(line_corpus, kind="paper", vocab_size=300)
    ids = encode_corpus(line_corpus, tokenizer)["valid"]
    expected = [i for row in LINES["valid"] for i in tokenizer.encode(row).ids]
    assert ids.tolist() == expected


def test_second_run_reads_memmap_cache_without_encoding(monkeypatch, line_corpus, cache_dir):
    tokenizer = train_tokenizer(line_corpus, vocab_size=300)
    first = encode_corpus(line_corpus, tokenizer)
    path = token_cache_path(line_corpus, "train", tokenizer_hash(tokenizer), cache_dir)
    assert path.is_file()
    assert np.array_equal(np.load(path), first["train"])

    def must_not_encode(*args, **kwargs):
        raise AssertionError("encoded again despite a cache hit")

    monkeypatch.setattr(tokens_module, "_encode_texts", must_not_encode)
    started = time.perf_counter()
    second = encode_corpus(line_corpus, tokenizer)
    assert time.perf_counter() - started < 1.0
    for split in first:
        assert isinstance(second[split], np.memmap)
        assert np.array_equal(second[split], first[split])
    assert list(cache_dir.rglob("*.tmp")) == []


def test_cache_invalidated_when_source_file_changes(tmp_path, write_text, cache_dir):
    write_text(tmp_path / "train.txt", "alpha beta gamma\n" * 20)
    valid = write_text(tmp_path / "valid.txt", "alpha beta\n")
    name = f"text:{tmp_path}"
    corpus = load_corpus(name)
    tokenizer = train_tokenizer(corpus, vocab_size=280)
    before = encode_corpus(corpus, tokenizer)["valid"].tolist()
    valid.write_text("gamma gamma alpha\n", encoding="utf-8")
    edited = load_corpus(name)
    tokenizer_again = train_tokenizer(edited, vocab_size=280)  # train text unchanged: cached
    assert tokenizer_hash(tokenizer_again) == tokenizer_hash(tokenizer)
    after = encode_corpus(edited, tokenizer_again)["valid"].tolist()
    assert after != before
    assert tokenizer.decode(after) == "gamma gamma alpha\n"
    assert len(list((cache_dir / "tokens").rglob("valid-*.npy"))) == 2


def test_cache_keyed_by_tokenizer(line_corpus, cache_dir):
    small = train_tokenizer(line_corpus, vocab_size=280)
    large = train_tokenizer(line_corpus, vocab_size=320)
    ids_small = encode_corpus(line_corpus, small)["train"]
    ids_large = encode_corpus(line_corpus, large)["train"]
    assert len(ids_large) < len(ids_small)
    assert small.decode(ids_small.tolist()) == large.decode(ids_large.tolist())


def test_large_vocab_uses_int32_and_round_trips(line_corpus):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = Corpus(
        "big", {"train": ["w69999 w1", "w65536 w0 w65535"], "valid": ["w70000x"]}, source="test"
    )
    ids = encode_corpus(corpus, tokenizer)
    assert ids["train"].dtype == np.int32
    assert ids["train"].tolist() == [69999, 1, 65536, 0, 65535]
    assert ids["valid"].tolist() == [70_000]
    assert ids_dtype(65_535) == np.uint16 and ids_dtype(65_536) == np.int32


def test_padding_tokenizer_is_not_padded_nor_mutated(line_corpus):
    tokenizer = train_tokenizer(line_corpus, vocab_size=300)
    plain = encode_corpus(line_corpus, tokenizer, splits=["valid"])["valid"].tolist()
    tokenizer.enable_padding(length=64)
    tokenizer.enable_truncation(max_length=2)
    padded = encode_corpus(line_corpus, tokenizer, splits=["valid"])["valid"].tolist()
    assert padded == plain
    assert tokenizer.padding is not None and tokenizer.truncation is not None


def test_unknown_split_rejected(line_corpus):
    tokenizer = train_tokenizer(line_corpus, vocab_size=300)
    with pytest.raises(KeyError, match="'test'"):
        encode_corpus(line_corpus, tokenizer, splits=["test"])


def test_real_wikitext2_small_pipeline(shared_data_dir):
    corpus = load_corpus(
        "wikitext2", data_dir=shared_data_dir, max_train_rows=1500, max_val_rows=200
    )
    tokenizer = train_tokenizer(corpus, vocab_size=500)
    ids = encode_corpus(corpus, tokenizer)
    assert {s: a.dtype for s, a in ids.items()} == {s: np.uint16 for s in corpus.splits}
    assert tokenizer.decode(ids["test"].tolist()) == "".join(corpus.texts("test"))
    assert len(ids["train"]) > 50_000  # ~1500 lines of Wikipedia at a 500-token vocabulary
    blocks = TokenBlocks(ids["valid"], block_size=128, drop_last=False)
    targets = np.concatenate([blocks[i][1].numpy() for i in range(len(blocks))])
    assert np.array_equal(targets[targets != -100], np.asarray(ids["valid"][1:], dtype=np.int64))


def test_cached_ids_outside_the_vocabulary_are_encoded_again(line_corpus, cache_dir, caplog):
    tokenizer = train_tokenizer(line_corpus, vocab_size=300)
    first = np.array(encode_corpus(line_corpus, tokenizer)["valid"])  # a copy, not the memmap
    path = token_cache_path(line_corpus, "valid", tokenizer_hash(tokenizer), cache_dir)
    damaged = first.copy()
    damaged[1] = 299 + 1000  # no such token
    np.save(path, damaged)
    with caplog.at_level("WARNING"):
        again = encode_corpus(line_corpus, tokenizer)["valid"]
    assert np.array_equal(again, first)
    assert str(path) in caplog.text and "outside" in caplog.text
