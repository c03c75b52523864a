"""Corpus loading: resolution order, layouts, file formats, splits and row limits."""

from __future__ import annotations

import sys
import types

import pytest

from gam.data import (
    KNOWN_CORPORA,
    Corpus,
    DataNotFoundError,
    default_data_dir,
    load_austen,
    load_corpus,
)

# ------------------------------------------------------------------------------------------
# resolution order


def test_explicit_dir_beats_env_var(tmp_path, monkeypatch, make_wikitext_dir):
    dir_a = make_wikitext_dir(tmp_path / "a", tag="A")
    dir_b = make_wikitext_dir(tmp_path / "b", tag="B")
    monkeypatch.setenv("GAM_DATA_DIR", str(dir_b))
    corpus = load_corpus("wikitext2", data_dir=dir_a)
    assert corpus.splits["train"][1] == " A train line 0 . "
    assert str(dir_a) in corpus.source
    assert default_data_dir(dir_a) == dir_a


def test_env_var_used_without_argument(tmp_path, monkeypatch, make_wikitext_dir):
    dir_b = make_wikitext_dir(tmp_path / "b", tag="B")
    monkeypatch.setenv("GAM_DATA_DIR", str(dir_b))
    corpus = load_corpus("wikitext2")
    assert corpus.splits["valid"][1] == " B valid line 0 . "
    assert "GAM_DATA_DIR" in corpus.source
    assert default_data_dir() == dir_b


def test_nothing_found_names_layout_places_and_hub_id():
    assert default_data_dir() is None
    with pytest.raises(DataNotFoundError) as info:
        load_corpus("wikitext2")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "<data_dir>/wikitext-2-raw/wiki.train.raw[.xz]" in message
    assert "$GAM_DATA_DIR: not set" in message
    assert "Salesforce/wikitext" in message and "wikitext-2-raw-v1" in message
    assert "`datasets` package is not importable" in message


def test_tinystories_not_found_names_its_layout_and_hub_id():
    with pytest.raises(DataNotFoundError) as info:
        load_corpus("tinystories")
    message = str(info.value)
    assert "<data_dir>/tinystories/train.txt[.xz]" in message
    assert "<data_dir>/tinystories/valid.txt[.xz]" in message
    assert "roneneldan/TinyStories" in message


def test_wrongly_laid_out_dir_names_the_missing_path(tmp_path, write_text):
    write_text(tmp_path / "wikitext-2-raw" / "wiki.train.raw", " a\n")
    write_text(tmp_path / "wikitext-2-raw" / "wiki.test.raw", " c\n")
    with pytest.raises(DataNotFoundError) as info:
        load_corpus("wikitext2", data_dir=tmp_path)
    message = str(info.value)
    missing = tmp_path / "wikitext-2-raw" / "wiki.valid.raw"
    assert f"missing {missing}[.xz]" in message
    assert "wiki.train.raw[.xz]," not in message.split("Tried")[1]  # present files not listed


def test_nonexistent_dir_is_reported(tmp_path):
    with pytest.raises(DataNotFoundError, match="is not a directory"):
        load_corpus("austen", data_dir=tmp_path / "nope")


def _fake_datasets(monkeypatch, rows_by_split=None, error=None, calls=None):
    """Install a fake `datasets` module whose load_dataset serves ``rows_by_split``."""
    module = types.ModuleType("datasets")

    def load_dataset(path, name=None, split=None, streaming=False):
        if calls is not None:
            calls.append((path, name, split, streaming))
        if error is not None:
            raise error
        rows = rows_by_split[split]
        if streaming:
            return iter([{"text": row} for row in rows])
        return {"text": list(rows)}

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


HUB_WIKITEXT = {
    "train": ["", " = Title = \n", "", " Some text . \n"],
    "validation": ["", " Valid text . \n"],
    "test": ["", " Test text . \n", ""],
}


def test_hub_used_when_no_local_copy(monkeypatch, tmp_path):
    calls: list = []
    _fake_datasets(monkeypatch, HUB_WIKITEXT, calls=calls)
    monkeypatch.setenv("GAM_DATA_DIR", str(tmp_path))  # exists but holds no wikitext
    corpus = load_corpus("wikitext2")
    # hub rows keep their "\n"; ours do not, blank rows stay "" (same rows as from files)
    assert corpus.splits["train"] == ["", " = Title = ", "", " Some text . "]
    assert corpus.splits["valid"] == ["", " Valid text . "]
    assert corpus.source.startswith("hf-hub:Salesforce/wikitext/wikitext-2-raw-v1")
    assert {c[2] for c in calls} == {"train", "validation", "test"}


def test_hub_rows_equal_file_rows(monkeypatch, tmp_path, write_text):
    folder = tmp_path / "wikitext-2-raw"
    write_text(folder / "wiki.train.raw", " \n = Title = \n \n Some text . \n")
    write_text(folder / "wiki.valid.raw", " \n Valid text . \n")
    write_text(folder / "wiki.test.raw", " \n Test text . \n \n")
    from_files = load_corpus("wikitext2", data_dir=tmp_path)
    _fake_datasets(monkeypatch, HUB_WIKITEXT)
    from_hub = load_corpus("wikitext2")
    assert from_hub.splits == from_files.splits
    assert from_hub.fingerprint("train") == from_files.fingerprint("train")


def test_hub_max_rows_streams_only_needed_rows(monkeypatch):
    calls: list = []
    _fake_datasets(monkeypatch, HUB_WIKITEXT, calls=calls)
    corpus = load_corpus("wikitext2", max_train_rows=2, max_val_rows=2)
    assert corpus.splits["train"] == ["", " = Title = "]
    assert corpus.splits["test"] == ["", " Test text . "]
    assert calls and all(streaming for *_, streaming in calls)


def test_hub_network_error_is_caught_and_reported(monkeypatch):
    _fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach the Hub"))
    with pytest.raises(DataNotFoundError) as info:
        load_corpus("wikitext2-tokens")
    message = str(info.value)
    assert "ConnectionError: Couldn't reach the Hub" in message
    assert "wikitext-2-v1" in message
    assert "<data_dir>/wikitext-2/wiki.train.tokens[.xz]" in message


def test_explicit_dir_is_authoritative_no_hub_fallback(monkeypatch, tmp_path):
    calls: list = []
    _fake_datasets(monkeypatch, HUB_WIKITEXT, calls=calls)
    with pytest.raises(DataNotFoundError, match="data_dir was given explicitly"):
        load_corpus("wikitext2", data_dir=tmp_path)
    assert calls == []


def test_use_hub_false_skips_hub(monkeypatch):
    calls: list = []
    _fake_datasets(monkeypatch, HUB_WIKITEXT, calls=calls)
    with pytest.raises(DataNotFoundError, match=r"skipped \(use_hub=False\)"):
        load_corpus("wikitext2", use_hub=False)
    assert calls == []


# ------------------------------------------------------------------------------------------
# names, formats, splits


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        load_corpus("wikitext103")
    for known in KNOWN_CORPORA:
        assert known in str(info.value)
    assert "text:PATH" in str(info.value)
    assert set(KNOWN_CORPORA) == {"wikitext2", "wikitext2-tokens", "tinystories", "austen",
                                  "python-stdlib"}


def test_empty_split_names_split_and_file(tmp_path, write_text):
    folder = tmp_path / "wikitext-2-raw"
    write_text(folder / "wiki.train.raw", " hello\n")
    empty = write_text(folder / "wiki.valid.raw", " \n \n")
    write_text(folder / "wiki.test.raw", " bye\n")
    with pytest.raises(ValueError) as info:
        load_corpus("wikitext2", data_dir=tmp_path)
    assert "'valid'" in str(info.value) and str(empty) in str(info.value)


@pytest.mark.parametrize("xz", [False, True])
def test_plain_and_xz_files_read_the_same(tmp_path, make_wikitext_dir, xz):
    corpus = load_corpus("wikitext2", data_dir=make_wikitext_dir(tmp_path, xz=xz))
    assert corpus.splits["train"] == [""] + [f" A train line {i} . " for i in range(6)]
    assert len(corpus.splits["test"]) == 5
    assert ("wiki" in corpus.source) and corpus.row_kind == "line"


def test_plain_file_preferred_over_xz(tmp_path, make_wikitext_dir, write_text):
    make_wikitext_dir(tmp_path, tag="XZ", xz=True)
    write_text(tmp_path / "wikitext-2-raw" / "wiki.train.raw", " plain wins\n")
    corpus = load_corpus("wikitext2", data_dir=tmp_path)
    assert corpus.splits["train"] == [" plain wins"]
    assert corpus.splits["valid"][1] == " XZ valid line 0 . "


def test_crlf_file_gives_same_rows_and_fingerprint(tmp_path, write_text):
    (tmp_path / "lf").mkdir()
    (tmp_path / "crlf").mkdir()
    write_text(tmp_path / "lf" / "c.txt", "a\nb\n\nc\nd\ne\nf\ng\nh\ni\n")
    (tmp_path / "crlf" / "c.txt").write_bytes(b"a\r\nb\r\n\r\nc\r\nd\r\ne\r\nf\r\ng\r\nh\r\ni\r\n")
    lf = load_corpus(f"text:{tmp_path / 'lf' / 'c.txt'}")
    crlf = load_corpus(f"text:{tmp_path / 'crlf' / 'c.txt'}")
    assert lf.splits == crlf.splits
    assert lf.fingerprint("train") == crlf.fingerprint("train")


def test_text_file_split_90_10_by_lines(tmp_path, write_text):
    lines = [f"line {i}" for i in range(20)]
    path = write_text(tmp_path / "notes.txt", "\n".join(lines) + "\n")
    corpus = load_corpus(f"text:{path}")
    assert corpus.splits["train"] == lines[:18]
    assert corpus.splits["valid"] == lines[18:]
    assert "test" not in corpus.splits
    assert corpus.name == f"text:{path}"


def test_text_file_xz_found_by_plain_name(tmp_path, write_text):
    write_text(tmp_path / "notes.txt", "one\ntwo\nthree\n", xz=True)
    corpus = load_corpus(f"text:{tmp_path / 'notes.txt'}")
    assert corpus.splits == {"train": ["one", "two"], "valid": ["three"]}


def test_text_dir_with_optional_test(tmp_path, write_text):
    write_text(tmp_path / "train.txt", "t1\nt2\nt3\n")
    write_text(tmp_path / "valid.txt", "v1\n", xz=True)
    corpus = load_corpus(f"text:{tmp_path}")
    assert corpus.splits == {"train": ["t1", "t2", "t3"], "valid": ["v1"]}
    write_text(tmp_path / "test.txt", "x1\nx2\n")
    corpus = load_corpus(f"text:{tmp_path}", max_train_rows=2, max_val_rows=1)
    assert corpus.splits == {"train": ["t1", "t2"], "valid": ["v1"], "test": ["x1"]}


def test_text_dir_missing_valid_and_missing_path(tmp_path, write_text):
    write_text(tmp_path / "train.txt", "t1\n")
    with pytest.raises(DataNotFoundError, match="valid.txt"):
        load_corpus(f"text:{tmp_path}")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_corpus(f"text:{tmp_path / 'absent.txt'}")
    with pytest.raises(ValueError, match="needs a path"):
        load_corpus("text:")


def test_text_file_needs_two_lines_and_text(tmp_path, write_text):
    one_line = write_text(tmp_path / "one.txt", "only\n")
    with pytest.raises(ValueError, match="at least 2"):
        load_corpus(f"text:{one_line}")
    blank = write_text(tmp_path / "blank.txt", "  \n\n")
    with pytest.raises(ValueError, match="'train'.*empty"):
        load_corpus(f"text:{blank}")


STORIES = (
    "Once upon a time there was a cat.\nThe cat liked milk.\n<|endoftext|>\n"
    "Tom had a red ball. He played all day.\n<|endoftext|>\n"
    "Sue saw a bird.<|endoftext|>The bird sang.\n<|endoftext|>\n"
)


def test_tinystories_loader_splits_stories(tmp_path, write_text):
    write_text(tmp_path / "tinystories" / "train.txt", STORIES)
    write_text(tmp_path / "tinystories" / "valid.txt", "Valid story one.\n<|endoftext|>\n", xz=True)
    corpus = load_corpus("tinystories", data_dir=tmp_path)
    assert corpus.row_kind == "document"
    assert corpus.splits["train"] == [
        "Once upon a time there was a cat.\nThe cat liked milk.",
        "Tom had a red ball. He played all day.",
        "Sue saw a bird.",
        "The bird sang.",
    ]
    assert corpus.splits["valid"] == ["Valid story one."]
    cut = load_corpus("tinystories", data_dir=tmp_path, max_train_rows=2)
    assert cut.splits["train"] == corpus.splits["train"][:2]


def test_max_rows_cut_train_and_eval_splits(tmp_path, make_wikitext_dir):
    root = make_wikitext_dir(tmp_path)
    corpus = load_corpus("wikitext2", data_dir=root, max_train_rows=3, max_val_rows=2)
    assert [len(corpus.splits[s]) for s in ("train", "valid", "test")] == [3, 2, 2]
    assert corpus.splits["train"] == ["", " A train line 0 . ", " A train line 1 . "]
    assert "max_train_rows=3" in corpus.source


def test_max_rows_leaving_only_blank_rows_is_an_error(tmp_path, make_wikitext_dir):
    with pytest.raises(ValueError, match="first 1 row"):
        load_corpus("wikitext2", data_dir=make_wikitext_dir(tmp_path), max_train_rows=1)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "10"])
def test_bad_max_rows_rejected(bad):
    with pytest.raises(ValueError, match="max_train_rows"):
        load_corpus("wikitext2", max_train_rows=bad)


def test_corpus_fingerprint_and_validation():
    corpus = Corpus("toy", {"train": ["ab", "c"], "valid": ["x"]}, source="test")
    same = Corpus("toy", {"train": ["ab", "c"], "valid": ["y"]}, source="other")
    regrouped = Corpus("toy", {"train": ["a", "bc"], "valid": ["x"]}, source="test")
    assert corpus.fingerprint("train") == same.fingerprint("train")
    assert corpus.fingerprint("valid") != same.fingerprint("valid")
    assert corpus.fingerprint("train") != regrouped.fingerprint("train")
    assert len(corpus.fingerprint("train")) == 64
    assert corpus.texts("train") == ["ab\n", "c\n"]
    assert "rows: train=2" in repr(corpus)
    with pytest.raises(KeyError, match="no split 'test'"):
        corpus.fingerprint("test")
    with pytest.raises(ValueError, match="'valid'"):
        Corpus("toy", {"train": ["a"]}, source="test")
    with pytest.raises(ValueError, match="row_kind"):
        Corpus("toy", {"train": ["a"], "valid": ["b"]}, source="test", row_kind="para")


def test_austen_split_searches_title_when_not_at_reference_line(tmp_path, write_text):
    text = "SENSE\n\nbody one\n\nPersuasion\n\nbody two\n"
    write_text(tmp_path / "fallback-prose" / "austen.txt", text, xz=True)
    corpus = load_austen(tmp_path)
    assert corpus.splits == {
        "train": ["SENSE", "", "body one"],
        "valid": ["Persuasion", "", "body two"],
    }
    write_text(tmp_path / "fallback-prose" / "austen.txt", "no title here\nat all\n")
    with pytest.raises(ValueError, match="Persuasion"):
        load_austen(tmp_path)


# ------------------------------------------------------------------------------------------
# real data (skipped when the shared data folder is absent)


def test_real_wikitext2_row_counts(shared_data_dir):
    corpus = load_corpus("wikitext2", data_dir=shared_data_dir)
    assert {s: len(r) for s, r in corpus.splits.items()} == {
        "train": 36718,
        "valid": 3760,
        "test": 4358,
    }
    assert corpus.splits["train"][:2] == ["", " = Valkyria Chronicles III = "]
    assert "<unk>" not in "".join(corpus.splits["valid"])
    cut = load_corpus("wikitext2", data_dir=shared_data_dir, max_train_rows=50, max_val_rows=5)
    assert cut.splits["train"] == corpus.splits["train"][:50]
    assert [len(cut.splits[s]) for s in ("valid", "test")] == [5, 5]


def test_real_wikitext2_tokens_variant(shared_data_dir):
    corpus = load_corpus("wikitext2-tokens", data_dir=shared_data_dir, max_val_rows=3760)
    assert len(corpus.splits["train"]) == 36718
    assert "<unk>" in "".join(corpus.splits["valid"])


def test_real_austen_holds_out_persuasion(shared_data_dir):
    corpus = load_austen(shared_data_dir)
    assert set(corpus.splits) == {"train", "valid"}
    assert corpus.splits["valid"][0] == "Persuasion"
    assert corpus.splits["train"][0] == "SENSE AND SENSIBILITY"
    # lines 1..65,099 minus the blank separator line, and lines 65,100..73,427
    assert len(corpus.splits["train"]) == 65_098
    assert len(corpus.splits["valid"]) == 73_427 - 65_099
    assert "Persuasion" not in corpus.splits["train"]
