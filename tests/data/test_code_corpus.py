"""The ``python-stdlib`` code corpus: which files, their split by path hash (deterministic),
its fingerprint, and a one-line error when the library folder is missing."""

from __future__ import annotations

import hashlib
import sysconfig

import pytest

from gam.data import KNOWN_CORPORA, Corpus, DataNotFoundError, load_corpus
from gam.data import code_corpus as cc


def stdlib_corpus(root) -> Corpus:
    splits, source, files = cc.read_python_stdlib(root=root)
    return Corpus("python-stdlib", splits, source, row_kind="document", files=files)


def fake_stdlib(root, n: int = 60):
    """A library folder with n modules, a package, a test suite and site-packages."""
    for i in range(n):
        (root / f"mod{i:03d}.py").write_text(f"def f{i}():\n    return {i}\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "notes.txt").write_text("not python\n")
    for skipped in ("test", "pkg/tests", "idlelib/idle_test", "site-packages/lib"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "test_x.py").write_text("assert True\n")
    return root


def test_files_are_sorted_and_tests_and_site_packages_left_out(tmp_path):
    files = cc.source_files(fake_stdlib(tmp_path))
    names = [f.relative for f in files]
    assert names == sorted(names)
    assert "pkg/__init__.py" in names and "mod000.py" in names
    assert not [n for n in names if "test" in n or "site-packages" in n or not n.endswith(".py")]
    assert len(names) == 61


def test_split_is_a_fixed_function_of_the_path(tmp_path):
    corpus = stdlib_corpus(fake_stdlib(tmp_path))
    again = stdlib_corpus(tmp_path)
    assert corpus.splits == again.splits and corpus.source == again.source
    for f in cc.source_files(tmp_path):
        bucket = int(hashlib.sha256(f.relative.encode()).hexdigest(), 16) % 100
        expected = "valid" if bucket < 5 else "test" if bucket < 10 else "train"
        assert cc.split_of(f.relative) == expected
        assert f.data.decode() in corpus.splits[expected]
    # a file added elsewhere moves no other file
    (tmp_path / "zzz_new.py").write_text("y = 2\n")
    grown = stdlib_corpus(tmp_path)
    for split in ("train", "valid", "test"):
        assert set(corpus.splits[split]) <= set(grown.splits[split])


def test_fingerprint_covers_paths_and_contents(tmp_path):
    files = cc.source_files(fake_stdlib(tmp_path))
    base = cc.stdlib_fingerprint(files)
    (tmp_path / "mod000.py").rename(tmp_path / "mod000b.py")  # same bytes, another path
    renamed = cc.stdlib_fingerprint(cc.source_files(tmp_path))
    (tmp_path / "mod001.py").write_text("changed\n")
    edited = cc.stdlib_fingerprint(cc.source_files(tmp_path))
    assert len({base, renamed, edited}) == 3
    corpus = stdlib_corpus(tmp_path)
    assert edited in corpus.source and all(edited in f for f in corpus.files.values())


def test_missing_folder_is_one_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-lib"
    with pytest.raises(FileNotFoundError, match="no-such-lib.*does not exist"):
        stdlib_corpus(missing)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(missing)})
    with pytest.raises(DataNotFoundError) as info:
        load_corpus("python-stdlib")
    assert "\n" not in str(info.value) and str(missing) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .py file"):
        stdlib_corpus(tmp_path / "empty")


def test_the_interpreters_library_loads_by_name():
    assert "python-stdlib" in KNOWN_CORPORA
    corpus = load_corpus("python-stdlib", max_train_rows=3, max_val_rows=2)
    assert [len(corpus.splits[s]) for s in ("train", "valid", "test")] == [3, 2, 2]
    assert corpus.row_kind == "document"
    # named, not located: a report of it holds no machine path
    assert sysconfig.get_paths()["stdlib"] not in corpus.source
    assert "standard library" in corpus.source and "Python 3." in corpus.source
