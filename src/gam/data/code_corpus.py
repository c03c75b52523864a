"""``python-stdlib``: a code corpus every machine has -- the ``.py`` files of the running
interpreter's standard library.

What it holds: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, walked without
following symbolic links, in sorted order of the path relative to that folder, *except*

- third-party code: anything under a ``site-packages`` or ``dist-packages`` folder;
- the standard library's own test suites: every file under a folder named ``test``, ``tests``
  or ``idle_test`` (``test/``, ``idlelib/idle_test/``, ``lib2to3/tests/``, ``ctypes/test/``,
  ...), about 60% of the bytes, dominated by test data rather than library code.

One row per file (``row_kind="document"``: the encoder ends each file with the end-of-text
token), the file's bytes decoded as UTF-8 (an undecodable byte becomes U+FFFD, so the text is a
fixed function of the bytes). A file goes to a split by a hash of its relative path alone --
``int(sha256(path)) % 100``: below :data:`VALID_PERCENT` ``valid``, below
``VALID_PERCENT + TEST_PERCENT`` ``test``, else ``train`` -- so a file stays in its split when
other files are added or removed (a new Python release moves only the files that changed).

What identifies it: :func:`stdlib_fingerprint` (SHA-256 over every relative path and its bytes,
in order) and the interpreter version are written into the corpus ``source`` and each split's
``files`` entry, which every run records in its ``config.json`` (``data.corpus_source``,
``data.files``); a run resumed or evaluated under another interpreter whose files differ is
refused by the recorded text fingerprint (:func:`gam.training.rundir.check_recorded_split`),
naming both.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

PYTHON_STDLIB = "python-stdlib"
"""The corpus name (:func:`gam.data.load_corpus`)."""
VALID_PERCENT = 5
TEST_PERCENT = 5
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})
"""Folder names whose whole subtree is left out (third-party code, test suites, bytecode)."""


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus: its path relative to the library folder (``/``-separated) and
    its bytes."""

    relative: str
    data: bytes


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative: str) -> str:
    """``train``, ``valid`` or ``test``: a fixed function of the relative path."""
    bucket = int(hashlib.sha256(relative.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < VALID_PERCENT:
        return "valid"
    if bucket < VALID_PERCENT + TEST_PERCENT:
        return "test"
    return "train"


def source_files(root: str | os.PathLike[str]) -> list[SourceFile]:
    """The corpus files under ``root`` in sorted relative-path order (see the module docstring
    for what is left out); FileNotFoundError naming ``root`` when it is missing or holds no
    ``.py`` file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"corpus {PYTHON_STDLIB!r}: the interpreter's standard-library folder {root} does "
            f"not exist (expected sysconfig.get_paths()['stdlib'] to hold the .py files of "
            f"Python {platform.python_version()}; some installations ship the library zipped "
            f"or without sources)")
    paths: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        paths += [(rel / name).as_posix() for name in files if name.endswith(".py")
                  and (Path(folder) / name).is_file()]
    if not paths:
        raise FileNotFoundError(
            f"corpus {PYTHON_STDLIB!r}: the standard-library folder {root} holds no .py file "
            f"outside {sorted(EXCLUDED_DIRS)} (an installation without library sources?)")
    return [SourceFile(p, (root / p).read_bytes()) for p in sorted(paths)]


def stdlib_fingerprint(files: list[SourceFile]) -> str:
    """SHA-256 over every file's relative path and bytes, each with its length in front."""
    digest = hashlib.sha256(b"gam-python-stdlib-v1\n")
    for f in files:
        for part in (f.relative.encode("utf-8"), f.data):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def read_python_stdlib(max_train_rows: int | None = None, max_val_rows: int | None = None,
                       root: str | os.PathLike[str] | None = None
                       ) -> tuple[dict[str, list[str]], str, dict[str, str]]:
    """The ``python-stdlib`` corpus of the files under ``root`` (default: the running
    interpreter's library, :func:`stdlib_dir`) as ``(splits, source, files)``, what
    :func:`gam.data.load_corpus` makes its ``Corpus`` of: rows are files, cut to the first
    ``max_train_rows`` / ``max_val_rows`` of each split."""
    # the interpreter's own library is named, not its path: reports made of it are shared
    where = "the running interpreter's standard library" if root is None else str(root)
    root = Path(root) if root is not None else stdlib_dir()
    files = source_files(root)
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for f in files:
        splits[split_of(f.relative)].append(f.data.decode("utf-8", errors="replace"))
    for split, rows in splits.items():
        limit = max_train_rows if split == "train" else max_val_rows
        splits[split] = list(islice(rows, limit))
        if not rows:
            raise ValueError(f"corpus {PYTHON_STDLIB!r}: no file of {root} falls in the {split} "
                             f"split ({len(files)} files in all; too few to split)")
    identity = (f"Python {platform.python_version()}, {len(files)} files, sha256 "
                f"{stdlib_fingerprint(files)}")
    limits = "".join(f", first {n} {s} files" for s, n in
                     (("train", max_train_rows), ("valid/test", max_val_rows)) if n is not None)
    return (splits, f"{where} ({identity}{limits})",
            {s: f"{where} ({s} files by path hash; {identity})" for s in splits})
