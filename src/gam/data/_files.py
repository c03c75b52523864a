"""Reading text files that may be stored plain or xz-compressed.

The shared data folder ships every file as ``*.xz`` to save space, while users who download
the official archives get plain files. Every loader therefore asks for a file by its plain
name and gets whichever copy exists (the plain one wins, it is faster to read).
"""

from __future__ import annotations

import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO

XZ_SUFFIX = ".xz"


def find_text_file(folder: Path, name: str) -> Path | None:
    """Return ``folder/name`` if it exists, else ``folder/name.xz`` if that exists, else None."""
    plain = folder / name
    if plain.is_file():
        return plain
    packed = folder / (name + XZ_SUFFIX)
    if packed.is_file():
        return packed
    return None


def describe_text_file(folder: Path | str, name: str) -> str:
    """How a wanted file is named in error messages: ``folder/name[.xz]``."""
    return f"{Path(folder) / name}[{XZ_SUFFIX}]"


def open_text(path: Path) -> IO[str]:
    """Open a UTF-8 text file, decompressing on the fly when its name ends in ``.xz``.

    Universal-newline mode is used on purpose, so a copy with CRLF line endings yields the same
    rows (and the same fingerprint) as the LF original.
    """
    if path.name.endswith(XZ_SUFFIX):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


class DataFileError(ValueError):
    """A data file exists but cannot be read as what it should be (a corrupted or truncated
    ``.xz``, a binary file given as text). The message names the file and what was expected."""


def _expected(path: Path) -> str:
    if path.name.endswith(XZ_SUFFIX):
        return "an xz-compressed UTF-8 text file"
    return "a UTF-8 text file"


def iter_lines(path: Path) -> Iterator[str]:
    """Yield the lines of a text file without their line terminator.

    Raises DataFileError (one line: the file, what was expected, what was found) when the file
    is not readable as its kind of text; lzma and codecs errors alone name no file.
    """
    try:
        with open_text(path) as handle:
            for line in handle:
                yield line[:-1] if line.endswith("\n") else line
    except UnicodeDecodeError as e:
        bad = e.object[e.start:e.start + 1].hex() if e.object else "?"
        raise DataFileError(f"data file {path} is not {_expected(path)}: it holds byte 0x{bad}, "
                            f"which is not valid UTF-8 (a binary file?)") from None
    except EOFError:
        raise DataFileError(f"data file {path} is truncated: expected {_expected(path)}, the "
                            f"xz stream ends early (copy or download it again)") from None
    except lzma.LZMAError as e:
        raise DataFileError(f"data file {path} is corrupted: expected {_expected(path)} ({e}; "
                            f"copy or download it again)") from None
