"""Unreadable data files are named with what was expected (one line, no lzma / codec error
alone), a missing corpus says --data-dir to a command-line user, and files written atomically
get the umask's mode, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import gam
from gam.cli import main
from gam.data import DataNotFoundError, load_corpus
from gam.data._files import DataFileError
from gam.files import atomic_write, atomic_write_json, default_mode, mkdtemp_default_mode
from gam.models.io import save_pretrained


def _wikitext(root: Path, make_wikitext_dir, damage: str) -> Path:
    make_wikitext_dir(root, xz=True)
    target = root / "wikitext-2-raw" / "wiki.train.raw.xz"
    data = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "corrupted":
        target.write_bytes(data[:12] + b"\x00" * (len(data) - 12))
    return target


@pytest.mark.parametrize("damage, word", [("truncated", "truncated"),
                                          ("corrupted", "corrupted")])
def test_damaged_xz_names_the_file(tmp_path, make_wikitext_dir, damage, word):
    target = _wikitext(tmp_path, make_wikitext_dir, damage)
    with pytest.raises(DataFileError) as info:
        load_corpus("wikitext2", data_dir=tmp_path)
    message = str(info.value)
    assert str(target) in message and word in message
    assert "xz-compressed UTF-8 text file" in message and "\n" not in message


def test_binary_file_given_as_text_names_the_file(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"ok line\n" + bytes(range(128, 256)) * 8)
    with pytest.raises(DataFileError) as info:
        load_corpus(f"text:{binary}")
    message = str(info.value)
    assert str(binary) in message and "UTF-8 text file" in message and "0x80" in message


def test_damaged_data_is_a_one_line_cli_error(tmp_path, make_wikitext_dir, capsys):
    target = _wikitext(tmp_path / "data", make_wikitext_dir, "truncated")
    code = main(["train", "--preset", "tiny", "--dataset", "wikitext2", "--data-dir",
                 str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--quiet",
                     "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("gam: error: data file ") and str(target) in err


def test_not_found_speaks_to_library_and_cli_users(tmp_path, capsys):
    with pytest.raises(DataNotFoundError) as info:
        load_corpus("wikitext2", data_dir=tmp_path)
    assert "data_dir=<folder>" in str(info.value) and "--data-dir" not in str(info.value)
    assert "--data-dir <folder>" in info.value.cli_message
    assert "data_dir" not in info.value.cli_message
    code = main(["train", "--preset", "tiny", "--dataset", "wikitext2", "--data-dir",
                 str(tmp_path), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "data_dir" not in err


def test_not_found_without_data_dir_says_data_dir_option(capsys, tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_corpus("austen", use_hub=False)
    assert "pass --data-dir <folder> or set $GAM_DATA_DIR" in info.value.cli_message


@pytest.fixture
def umask():
    """Set the process umask for a test, restoring it afterwards."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert default_mode() == 0o666 & ~mask
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    atomic_write_json(tmp_path / "b.json", {"a": 1})
    save_pretrained(gam.build_model("gam", "tiny"), tmp_path / "model")
    for path in (tmp_path / "a.bin", tmp_path / "b.json", tmp_path / "model" / "model.json",
                 tmp_path / "model" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    folder = mkdtemp_default_mode(tmp_path, prefix=".export.")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask


def test_mkstemp_is_not_used_with_its_private_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "c.txt"
    atomic_write(path, lambda f: f.write(b"y"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
