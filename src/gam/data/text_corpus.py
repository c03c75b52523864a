"""``text:PATH`` corpora: a text file split by lines, or a folder of split files."""

from __future__ import annotations

import errno
import stat
from itertools import islice
from pathlib import Path

from gam.data._files import describe_text_file, find_text_file
from gam.data.corpus import (
    Corpus,
    DataNotFoundError,
    check_not_empty,
    describe_limits,
    iter_line_rows,
    limit_for,
)

TEXT_PREFIX = "text:"
"""Prefix of ad-hoc corpora: ``text:FILE`` or ``text:DIR``."""

TEXT_TRAIN_FRACTION = 0.9
"""Share of the lines of a single ``text:FILE`` that goes to ``train`` (the rest is ``valid``)."""

_TEXT_EXPECTED = (
    "a text file (plain or .xz) or a folder with train.txt, valid.txt and optionally "
    "test.txt (each plain or .xz)"
)


def check_text_corpus_path(path: Path) -> None:
    """A ``text:PATH`` corpus path must be a regular file (or ``PATH.xz``) or a folder:
    DataNotFoundError if it does not exist, ValueError for a symlink loop or a device, pipe or
    socket (which would be read forever or not at all)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"text corpus path {path} is a symlink loop; expected "
                             f"{_TEXT_EXPECTED}") from None
        if find_text_file(path.parent, path.name) is not None:  # PATH.xz
            return
        raise DataNotFoundError(
            f"text corpus path {path} does not exist; expected {_TEXT_EXPECTED}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f"text corpus path {path} is not a regular file or a folder (a device, "
                         f"pipe or socket); expected {_TEXT_EXPECTED}")


def load_text_corpus(name: str, max_train_rows: int | None, max_val_rows: int | None) -> Corpus:
    """The corpus ``text:PATH`` (``name``): a folder's ``train.txt``, ``valid.txt`` and
    optional ``test.txt``, or one file's lines split :data:`TEXT_TRAIN_FRACTION` / rest."""
    raw = name[len(TEXT_PREFIX) :]
    if not raw:
        raise ValueError(f"{TEXT_PREFIX!r} needs a path, e.g. '{TEXT_PREFIX}notes.txt'")
    path = Path(raw).expanduser()
    check_text_corpus_path(path)
    limits = (max_train_rows, max_val_rows)
    expected = _TEXT_EXPECTED
    if path.is_dir():
        paths: dict[str, Path] = {}
        missing: list[str] = []
        for split in ("train", "valid", "test"):
            found = find_text_file(path, f"{split}.txt")
            if found is not None:
                paths[split] = found
            elif split != "test":
                missing.append(describe_text_file(path, f"{split}.txt"))
        if missing:
            raise DataNotFoundError(
                f"text corpus folder {path} lacks {', '.join(missing)}; expected {expected}"
            )
        splits: dict[str, list[str]] = {}
        for split, split_path in paths.items():
            limit = limit_for(split, limits)
            splits[split] = list(islice(iter_line_rows(split_path), limit))
            check_not_empty(name, split, splits[split], str(split_path), limit)
        source = f"{path}{describe_limits(limits)}"
        return Corpus(name=name, splits=splits, source=source, row_kind="line",
                      files={split: str(found) for split, found in paths.items()})

    file_path = path if path.is_file() else find_text_file(path.parent, path.name)
    if file_path is None:
        raise DataNotFoundError(f"text corpus path {path} does not exist; expected {expected}")
    lines = list(iter_line_rows(file_path))
    if not any(lines):
        raise ValueError(f"split 'train' of corpus {name!r} is empty: {file_path} has no text")
    if len(lines) < 2:
        raise ValueError(
            f"{file_path} has {len(lines)} line(s); a single-file text corpus needs at least 2 "
            f"lines to split {TEXT_TRAIN_FRACTION:.0%} / {1 - TEXT_TRAIN_FRACTION:.0%} by lines"
        )
    n_train = min(max(int(len(lines) * TEXT_TRAIN_FRACTION), 1), len(lines) - 1)
    splits = {
        "train": lines[:n_train][: limit_for("train", limits)],
        "valid": lines[n_train:][: limit_for("valid", limits)],
    }
    for split, rows in splits.items():
        where = f"{file_path} ({split} part: lines " + (
            f"1-{n_train})" if split == "train" else f"{n_train + 1}-{len(lines)})"
        )
        check_not_empty(name, split, rows, where, limit_for(split, limits))
    source = f"{file_path} (lines split {TEXT_TRAIN_FRACTION:.0%}/{1 - TEXT_TRAIN_FRACTION:.0%})"
    return Corpus(name=name, splits=splits, source=source + describe_limits(limits),
                  files={split: str(file_path) for split in splits})
