"""The :class:`Corpus` structure every corpus reader returns, its row conventions and row
limits, and :class:`DataNotFoundError` (how the corpora are found: :mod:`gam.data.corpora`).

Row conventions (those of the Hugging Face ``wikitext`` builder, so local and hub copies agree):

* ``row_kind="line"``: a row is one line of a continuous text, without its newline;
  whitespace-only lines become ``""`` (:func:`normalize_line`) and are kept, so that rows can
  be joined back with ``"\\n"``.
* ``row_kind="document"``: a row is one self-contained document; the encoder puts an
  end-of-text token after each.

Row limits ``(max_train_rows, max_val_rows)`` cut the ``train`` split and every evaluation
split to their first rows (:func:`limit_for`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gam.data._files import iter_lines

ROW_KINDS = ("line", "document")


class DataNotFoundError(FileNotFoundError):
    """A corpus could not be found in any of the places it may live.

    Subclasses :class:`FileNotFoundError` so callers that already handle missing files keep
    working; the message lists the expected folder layout and every place that was tried.
    ``str(error)`` speaks to a library caller (``data_dir=<folder>``); ``cli_message`` says
    the same to a command-line user (``--data-dir <folder>``).
    """

    def __init__(self, message: str, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message if cli_message is not None else message


@dataclass(repr=False)
class Corpus:
    """A text corpus split into rows.

    Attributes:
        name: the name it was loaded under (``"wikitext2"``, ``"text:notes.txt"``...); part of
            every cache key.
        splits: rows of text per split: ``"train"``, ``"valid"`` and optionally ``"test"``.
        source: where the text came from, for logs (folder, file or hub id, and row cuts).
        row_kind: ``"line"`` -- rows are lines of one continuous text, joined with ``"\\n"`` --
            or ``"document"`` -- rows are independent documents separated by end-of-text.
        files: the file (or hub split) each split was read from, for records and messages.
    """

    name: str
    splits: dict[str, list[str]]
    source: str
    row_kind: str = "line"
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.row_kind not in ROW_KINDS:
            raise ValueError(f"row_kind must be one of {ROW_KINDS}, got {self.row_kind!r}")
        missing = [s for s in ("train", "valid") if s not in self.splits]
        if missing:
            raise ValueError(
                f"corpus {self.name!r} lacks split(s) {missing}; every corpus needs 'train' and "
                f"'valid', got {sorted(self.splits)}"
            )

    def __repr__(self) -> str:  # the default repr would print every row
        counts = ", ".join(f"{s}={len(r)}" for s, r in self.splits.items())
        return (
            f"Corpus(name={self.name!r}, rows: {counts}, row_kind={self.row_kind!r}, "
            f"source={self.source!r})"
        )

    def rows(self, split: str) -> list[str]:
        """The rows of ``split``; raises ``KeyError`` naming the splits that do exist."""
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(
                f"corpus {self.name!r} has no split {split!r}; it has {sorted(self.splits)}"
            ) from None

    def texts(self, split: str) -> list[str]:
        """The strings to tokenize for ``split``, one per row.

        Line rows get their newline back (``row + "\\n"``) so concatenating the texts restores
        the original text; document rows are returned as they are (the encoder separates them
        with end-of-text ids).
        """
        rows = self.rows(split)
        if self.row_kind == "line":
            return [row + "\n" for row in rows]
        return list(rows)

    def fingerprint(self, split: str) -> str:
        """SHA-256 (hex) of the text of ``split``, used to key caches.

        Each row is hashed with its byte length in front, so different row divisions of the same
        characters hash differently; the row kind is hashed too because it changes the token
        stream. Any edit to the source text, or a different row cut, changes the fingerprint.
        """
        digest = hashlib.sha256(f"gam-corpus-v1 {self.row_kind}\n".encode())
        for row in self.rows(split):
            data = row.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()


def normalize_line(line: str) -> str:
    """Whitespace-only lines become ``""`` (the Hugging Face wikitext convention)."""
    return line if line.strip() else ""


def iter_line_rows(path: Path) -> Iterator[str]:
    return (normalize_line(line) for line in iter_lines(path))


def check_row_limit(label: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label} must be a positive int or None, got {value!r}")


def limit_for(split: str, limits: tuple[int | None, int | None]) -> int | None:
    """``max_train_rows`` for train, ``max_val_rows`` for every evaluation split."""
    return limits[0] if split == "train" else limits[1]


def describe_limits(limits: tuple[int | None, int | None]) -> str:
    labels = ("max_train_rows", "max_val_rows")
    parts = [f"{lab}={val}" for lab, val in zip(labels, limits, strict=True) if val is not None]
    return f" [{', '.join(parts)}]" if parts else ""


def check_not_empty(name: str, split: str, rows: list[str], where: str, limit: int | None) -> None:
    if any(row.strip() for row in rows):
        return
    cut = f" after keeping only its first {limit} row(s)" if limit is not None else ""
    raise ValueError(
        f"split {split!r} of corpus {name!r} is empty (no non-blank rows){cut}; read from {where}"
    )
