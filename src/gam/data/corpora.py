"""Text corpora: where they are found, how they are split into rows, and how they are named.

A :class:`Corpus` is plain text, split into ``train`` / ``valid`` (and optionally ``test``) lists
of rows. Everything downstream (tokenizer training, token ids, caches) works from this one
structure, so the same corpus gives the same rows -- and the same fingerprint -- whether it was
read from a local folder or fetched from the Hugging Face hub.

Where a named corpus comes from, in order:

1. the ``data_dir`` argument, if given. It is *authoritative*: when it lacks the files the call
   fails and names the missing paths, instead of silently downloading something else (a typo
   in ``--data-dir`` should not turn into a hub download);
2. ``$GAM_DATA_DIR``, if set (a global default that may hold only some corpora, so a corpus
   missing there falls through to the hub);
3. the Hugging Face hub through ``datasets`` (only if it is importable and reachable);
4. otherwise one :class:`DataNotFoundError` naming the expected layout, every place tried and
   the hub id.

Row conventions (those of the Hugging Face ``wikitext`` builder, so local and hub copies agree):

* ``row_kind="line"`` (WikiText-2, Austen, ``text:`` corpora): a row is one line of a continuous
  text, without its newline; whitespace-only lines become ``""`` and are kept, so that rows can
  be joined back with ``"\\n"``.
* ``row_kind="document"`` (TinyStories): a row is one self-contained document (a story); the
  encoder puts an end-of-text token after each.

``max_train_rows`` cuts the ``train`` split, ``max_val_rows`` cuts every evaluation split
(``valid`` and ``test``), always to the *first* rows, after splitting, for every source.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from gam.data._files import describe_text_file, find_text_file, iter_lines
from gam.data.code_corpus import PYTHON_STDLIB, read_python_stdlib
from gam.data.corpus import (
    Corpus,
    DataNotFoundError,
    check_not_empty,
    check_row_limit,
    describe_limits,
    iter_line_rows,
    limit_for,
    normalize_line,
)
from gam.data.text_corpus import TEXT_PREFIX, load_text_corpus

logger = logging.getLogger(__name__)

ENV_DATA_DIR = "GAM_DATA_DIR"
"""Environment variable holding the default data folder."""

EOT_MARKER = "<|endoftext|>"
"""Separator between stories in TinyStories text files."""

AUSTEN_VALID_TITLE = "Persuasion"
AUSTEN_VALID_START_LINE = 65_100
"""1-based line where *Persuasion*, the held-out validation novel, starts in ``austen.txt``."""


@dataclass(frozen=True)
class _Spec:
    """How a named corpus is laid out on disk and on the hub."""

    title: str
    folder: str
    files: dict[str, str]  # split (or "all" for a file that is split here) -> plain file name
    row_kind: str
    reader: str = "lines"  # "lines" | "stories" | "austen"
    hub_id: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split -> hub split

    def layout(self) -> str:
        return ", ".join(
            describe_text_file(f"<data_dir>/{self.folder}", name) for name in self.files.values()
        )

    def hub_label(self) -> str:
        if self.hub_id is None:
            return "Hugging Face hub: no hub copy of this corpus exists"
        config = f", config {self.hub_config!r}" if self.hub_config else ""
        return f"Hugging Face hub id {self.hub_id!r}{config}"


_WIKITEXT_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

_SPECS: dict[str, _Spec] = {
    "wikitext2": _Spec(
        title="WikiText-2, raw",
        folder="wikitext-2-raw",
        files={s: f"wiki.{s}.raw" for s in ("train", "valid", "test")},
        row_kind="line",
        hub_id="Salesforce/wikitext",  # the hub's current name of the former `wikitext`
        hub_config="wikitext-2-raw-v1",
        hub_splits=_WIKITEXT_HUB_SPLITS,
    ),
    "wikitext2-tokens": _Spec(
        title="WikiText-2, tokenized with <unk>",
        folder="wikitext-2",
        files={s: f"wiki.{s}.tokens" for s in ("train", "valid", "test")},
        row_kind="line",
        hub_id="Salesforce/wikitext",
        hub_config="wikitext-2-v1",
        hub_splits=_WIKITEXT_HUB_SPLITS,
    ),
    "tinystories": _Spec(
        title=f"TinyStories, stories separated by {EOT_MARKER}",
        folder="tinystories",
        files={"train": "train.txt", "valid": "valid.txt"},
        row_kind="document",
        reader="stories",
        hub_id="roneneldan/TinyStories",
        hub_splits={"train": "train", "valid": "validation"},
    ),
    "austen": _Spec(
        title="Jane Austen's six novels (stand-in for TinyStories; Persuasion is validation)",
        folder="fallback-prose",
        files={"all": "austen.txt"},
        row_kind="line",
        reader="austen",
    ),
}

KNOWN_CORPORA: tuple[str, ...] = (*_SPECS, PYTHON_STDLIB)
"""Named corpora accepted by :func:`load_corpus` (besides ``text:PATH``)."""


class _Missing(Exception):
    """Internal: a local folder does not hold a corpus (message says what is missing)."""


class _HubUnavailable(Exception):
    """Internal: the hub could not provide a corpus (message says why)."""


def load_corpus(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    max_train_rows: int | None = None,
    max_val_rows: int | None = None,
    *,
    use_hub: bool = True,
) -> Corpus:
    """Load a corpus by name.

    Args:
        name: one of :data:`KNOWN_CORPORA` -- ``"wikitext2"`` (raw WikiText-2, the paper's
            corpus), ``"wikitext2-tokens"`` (the ``<unk>`` variant), ``"tinystories"``,
            ``"austen"`` (see :func:`load_austen`), ``"python-stdlib"`` (the interpreter's
            library, :mod:`gam.data.code_corpus`) -- or ``"text:PATH"`` where PATH is a text
            file (its lines are split 90/10 into train/valid) or a folder with ``train.txt``,
            ``valid.txt`` and optionally ``test.txt`` (plain or ``.xz``).
        data_dir: folder holding the corpus folders (see the module docstring for the order in
            which places are searched). Ignored for ``text:`` corpora.
        max_train_rows: keep only the first rows of ``train`` (the paper uses 50,000).
        max_val_rows: keep only the first rows of ``valid`` and ``test`` (the paper: 5,000).
        use_hub: set False to never contact the Hugging Face hub (it retries for ~25 s when
            offline; ``HF_HUB_OFFLINE=1`` also makes it fail fast).

    Raises:
        ValueError: unknown name, bad row limit, or a split with no text.
        DataNotFoundError: the corpus is in none of the places searched.
    """
    check_row_limit("max_train_rows", max_train_rows)
    check_row_limit("max_val_rows", max_val_rows)
    if not isinstance(name, str):
        raise TypeError(f"corpus name must be a str, got {type(name).__name__}")
    if name.startswith(TEXT_PREFIX):
        return load_text_corpus(name, max_train_rows, max_val_rows)
    if name == PYTHON_STDLIB:  # found on every machine: data_dir and the hub play no part
        try:
            splits, source, files = read_python_stdlib(max_train_rows, max_val_rows)
        except FileNotFoundError as exc:
            raise DataNotFoundError(str(exc)) from None
        return Corpus(name, splits, source, row_kind="document", files=files)
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(
            f"unknown corpus {name!r}; known names: {', '.join(KNOWN_CORPORA)}, "
            f"or '{TEXT_PREFIX}PATH' for a text file or folder"
        )
    limits = (max_train_rows, max_val_rows)
    attempts: list[str] = []

    if data_dir is not None:
        root = Path(data_dir).expanduser()
        try:
            return _load_from_dir(name, spec, root, "data_dir argument", limits)
        except _Missing as missing:
            attempts.append(f"{_DATA_DIR_OPTION} argument: {missing}")
        raise _not_found(
            name,
            spec,
            attempts,
            note=f"Not consulted because {_DATA_DIR_OPTION} was given explicitly: "
            f"${ENV_DATA_DIR}"
            + (f" and the {spec.hub_label()}." if spec.hub_id else f". {spec.hub_label()}."),
        )

    env_dir = os.environ.get(ENV_DATA_DIR)
    if env_dir:
        try:
            return _load_from_dir(
                name, spec, Path(env_dir).expanduser(), f"${ENV_DATA_DIR}", limits
            )
        except _Missing as missing:
            attempts.append(f"${ENV_DATA_DIR}: {missing}")
    else:
        attempts.append(f"${ENV_DATA_DIR}: not set")

    if spec.hub_id is None:
        attempts.append(spec.hub_label())
    elif not use_hub:
        attempts.append(f"{spec.hub_label()}: skipped (use_hub=False)")
    else:
        try:
            return _load_from_hub(name, spec, limits)
        except _HubUnavailable as why:
            attempts.append(f"{spec.hub_label()}: {why}")
    raise _not_found(name, spec, attempts)


def load_austen(
    data_dir: str | os.PathLike[str] | None = None,
    max_train_rows: int | None = None,
    max_val_rows: int | None = None,
) -> Corpus:
    """Jane Austen's six novels, a *stand-in* for TinyStories when it is not available.

    It is real narrative English but adult 19th-century prose, not children's stories: results
    on it are not comparable with TinyStories numbers and must be reported as such.
    *Persuasion* (from line 65,100 of ``fallback-prose/austen.txt``) is held out as ``valid``;
    the five novels before it are ``train``; there is no ``test`` split. Rows are the original
    hard-wrapped lines.
    """
    return load_corpus("austen", data_dir, max_train_rows, max_val_rows)


def default_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder named corpora are read from: ``data_dir`` if given, else ``$GAM_DATA_DIR``,
    else None (meaning: only the hub will be tried)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env_dir = os.environ.get(ENV_DATA_DIR)
    return Path(env_dir).expanduser() if env_dir else None


# ---------------------------------------------------------------------------------------------
# local folders


def _load_from_dir(
    name: str, spec: _Spec, root: Path, origin: str, limits: tuple[int | None, int | None]
) -> Corpus:
    if not root.is_dir():
        raise _Missing(f"{root} is not a directory")
    folder = root / spec.folder
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for split, file_name in spec.files.items():
        path = find_text_file(folder, file_name)
        if path is None:
            missing.append(describe_text_file(folder, file_name))
        else:
            paths[split] = path
    if missing:
        raise _Missing("missing " + ", ".join(missing))

    if spec.reader == "austen":
        splits, files = _read_austen(paths["all"], limits)
    else:
        splits, files = {}, {}
        for split, path in paths.items():
            limit = limit_for(split, limits)
            rows = _iter_stories(path) if spec.reader == "stories" else iter_line_rows(path)
            splits[split] = list(islice(rows, limit))
            files[split] = str(path)
    for split, rows in splits.items():
        check_not_empty(name, split, rows, files[split], limit_for(split, limits))
    source = f"{folder} ({origin}){describe_limits(limits)}"
    logger.info("loaded corpus %s from %s", name, source)
    return Corpus(name=name, splits=splits, source=source, row_kind=spec.row_kind, files=files)


def _iter_stories(path: Path) -> Iterator[str]:
    """Yield the stories of a TinyStories text file (stories separated by ``<|endoftext|>``).

    Streams the file, so cutting to the first N stories of the 2 GB train file reads only
    those. Stories are stripped; empty ones (e.g. after a trailing separator) are dropped.
    """
    buffer: list[str] = []
    for line in iter_lines(path):
        while EOT_MARKER in line:
            before, line = line.split(EOT_MARKER, 1)
            buffer.append(before)
            story = "\n".join(buffer).strip()
            if story:
                yield story
            buffer = []
        buffer.append(line)
    story = "\n".join(buffer).strip()
    if story:
        yield story


def _read_austen(
    path: Path, limits: tuple[int | None, int | None]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    lines = list(iter_line_rows(path))
    start = AUSTEN_VALID_START_LINE - 1
    if not (start < len(lines) and lines[start].strip() == AUSTEN_VALID_TITLE):
        # Not the reference file: look for the title line rather than trusting the number.
        found = [i for i, line in enumerate(lines) if line.strip() == AUSTEN_VALID_TITLE]
        if not found:
            raise ValueError(
                f"{path}: no line {AUSTEN_VALID_TITLE!r} marks the start of the validation "
                f"novel (expected at line {AUSTEN_VALID_START_LINE:,} of the six-novel file)"
            )
        start = found[0]
    train = lines[:start]
    while train and not train[-1]:  # drop the blank line that separates the novels
        train.pop()
    splits = {
        "train": train[: limit_for("train", limits)],
        "valid": lines[start:][: limit_for("valid", limits)],
    }
    where = f"{path} (Persuasion, from line {start + 1:,})"
    return splits, {"train": f"{path} (lines before {start + 1:,})", "valid": where}


# ---------------------------------------------------------------------------------------------
# Hugging Face hub


def _hub_rows(hub_id: str, config: str | None, hub_split: str, limit: int | None) -> list[str]:
    """Fetch the ``text`` column of one hub split (first ``limit`` rows if given).

    With a limit the split is streamed, so only the rows needed are downloaded. Any failure
    (``datasets`` missing, no network, dataset renamed...) becomes ``_HubUnavailable``.
    """
    try:
        import datasets
    except ImportError as exc:
        raise _HubUnavailable(
            "the `datasets` package is not importable (pip install 'gam[hub]')"
        ) from exc
    try:
        if limit is None:
            dataset = datasets.load_dataset(hub_id, config, split=hub_split)
            return list(dataset["text"])
        stream = datasets.load_dataset(hub_id, config, split=hub_split, streaming=True)
        return [record["text"] for record in islice(stream, limit)]
    except Exception as exc:  # network, offline mode, auth, renamed dataset: all "unavailable"
        raise _HubUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _load_from_hub(name: str, spec: _Spec, limits: tuple[int | None, int | None]) -> Corpus:
    assert spec.hub_id is not None
    splits: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    for split, hub_split in spec.hub_splits.items():
        limit = limit_for(split, limits)
        raw_rows = _hub_rows(spec.hub_id, spec.hub_config, hub_split, limit)
        if spec.row_kind == "line":  # hub rows keep their "\n"; ours do not
            rows = [normalize_line(row[:-1] if row.endswith("\n") else row) for row in raw_rows]
        else:
            rows = [row.strip() for row in raw_rows if row.strip()]
        where = f"hub {spec.hub_id} ({spec.hub_config or 'default'}) split {hub_split!r}"
        check_not_empty(name, split, rows, where, limit)
        splits[split] = rows
        files[split] = where
    config = f"/{spec.hub_config}" if spec.hub_config else ""
    source = f"hf-hub:{spec.hub_id}{config}{describe_limits(limits)}"
    logger.info("loaded corpus %s from %s", name, source)
    return Corpus(name=name, splits=splits, source=source, row_kind=spec.row_kind, files=files)


# ---------------------------------------------------------------------------------------------
# helpers


# stands for the data-folder option in messages built once for two audiences
_DATA_DIR_OPTION = "\0data-dir-option\0"


def _not_found(name: str, spec: _Spec, attempts: list[str], note: str = "") -> DataNotFoundError:
    tried = "\n".join(f"  {i}. {attempt}" for i, attempt in enumerate(attempts, 1))
    message = (
        f"corpus {name!r} ({spec.title}) was not found.\n"
        f"Expected layout (plain or .xz): {spec.layout()}\n"
        f"Tried, in order:\n{tried}\n"
        + (f"{note}\n" if note else "")
        + f"Fix: pass {_DATA_DIR_OPTION}=<folder> or set ${ENV_DATA_DIR}=<folder>"
        + (", or make the hub reachable." if spec.hub_id else ".")
    )
    library = message.replace(f"{_DATA_DIR_OPTION} argument", "data_dir argument")
    cli = message.replace(f"{_DATA_DIR_OPTION} argument", "--data-dir")
    cli = cli.replace(f"{_DATA_DIR_OPTION}=<folder>", "--data-dir <folder>")
    cli = cli.replace("<data_dir>/", "<folder>/")
    return DataNotFoundError(library.replace(_DATA_DIR_OPTION, "data_dir"),
                             cli.replace(_DATA_DIR_OPTION, "--data-dir"))
