"""Faults from outside the program, kept fixed: files planted in folders gam reads (a pickle, a
compiled library) never run; running out of memory or disk, and nonsense values on the command
line or to the library, are one clear line (or a ValueError), and leave nothing that blocks a
retry."""

from __future__ import annotations

import errno
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from gam.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory, private_gam_environment):
    with private_gam_environment(tmp_path_factory.mktemp("gam-cache")) as cache:
        yield cache


def train_args(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["train", "--model", "gam", "--preset", "tiny", "--dataset", "wikitext2",
            "--data-dir", str(data_dir), "--max-train-rows", "300", "--max-val-rows", "30",
            "--vocab-size", "400", "--batch-size", "8", "--warmup-steps", "1", "--quiet",
            "--threads", "1", "--max-steps", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    """A finished 1-step run (and a warm tokenizer / token-id cache for the tests below)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(out, data_dir)) == 0
    return out


def one_line_error(capsys, *expected: str) -> str:
    """The command's last stderr line, checked to hold ``expected``; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for text in expected:
        assert text in last, (text, last)
    return last


# --------------------------------------------------------------------------- planted pickles
class _Planted:
    """Unpickling this creates the file ``marker``: code that ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_planted_pickle_in_a_recall_checkpoint_never_runs(tmp_path, how):
    from gam.bench import recall_training

    marker, ckpt = tmp_path / "ran", tmp_path / "cfg.ckpt"
    payload = {"key": recall_training.key_text({"k": 1}), "step": 3, "evil": _Planted(marker)}
    if how == "pickle":
        ckpt.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, ckpt)
    assert recall_training.load_checkpoint(ckpt, {"k": 1}) is None  # refused: not plain data
    assert not marker.exists()


def test_recall_checkpoints_round_trip_as_plain_data_and_check_their_key(tmp_path):
    from gam.bench import recall_training

    ckpt = tmp_path / "cfg.ckpt"
    key = {"model": "gam", "pairs": (4, 8), "lr": 3e-3}
    recall_training.save_checkpoint(ckpt, {"key": key, "step": 8, "w": torch.ones(2)})
    assert recall_training.load_checkpoint(ckpt, {**key, "pairs": [4, 8]})["step"] == 8
    # another configuration's
    assert recall_training.load_checkpoint(ckpt, {**key, "lr": 1e-2}) is None


def test_nothing_in_src_unpickles_a_file():
    calls = []
    for path in SRC.rglob("*.py"):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert calls
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert not unsafe, unsafe
    for path in SRC.rglob("*.py"):
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle=True", path.read_text()), path


# ------------------------------------------------------------------------ planted libraries
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("GAM_PLANTED_MARKER"), "w");
    if (f) fclose(f);
}
"""
FAKE_VERSION = "fake-c++ 1.0"


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a planted library")
    folder = tmp_path_factory.mktemp("planted")
    (folder / "planted.c").write_text(PLANTED_C)
    subprocess.run([cc, "-shared", "-fPIC", str(folder / "planted.c"), "-o",
                    str(folder / "libplanted.so")], check=True, capture_output=True, timeout=120)
    return folder / "libplanted.so"


@pytest.fixture
def scan_kernel(tmp_path, monkeypatch):
    """``gam.models.ops._scan_cpp`` as on first use, with a compiler that knows its version but
    fails every build (so that only a library found in a cache could be loaded)."""
    from gam.models.ops import _scan_cpp

    fake = tmp_path / "fake-cxx"
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "{FAKE_VERSION}" && exit 0\n'
                    f'exit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.delenv("GAM_SCAN_KERNEL", raising=False)
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GAM_PLANTED_MARKER", str(tmp_path / "ran"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for name, value in (("_tried", False), ("_lib", None), ("_error", None)):
        monkeypatch.setattr(_scan_cpp, name, value)
    return _scan_cpp


def _plant(scan_kernel, planted_library: Path, which: int = 0, digest: str | None = "right"
           ) -> Path:
    key = scan_kernel.build_key(scan_kernel.BASE_FLAGS + scan_kernel.ARCH_FLAGS[0],
                                FAKE_VERSION + "\n")
    folder = scan_kernel.cache_folders(key)[which]
    folder.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    folder.mkdir(mode=0o700)
    shutil.copy(planted_library, folder / scan_kernel.LIBRARY)
    if digest is not None:
        value = scan_kernel._sha256(folder / scan_kernel.LIBRARY) if digest == "right" \
            else "0" * 64
        (folder / (scan_kernel.LIBRARY + scan_kernel.DIGEST_SUFFIX)).write_text(value)
    return folder


def _load(scan_kernel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return scan_kernel.load()


def test_a_library_built_into_a_private_folder_is_loaded(scan_kernel, planted_library, tmp_path):
    # the control: the plant works, so the refusals below are refusals
    _plant(scan_kernel, planted_library)
    _load(scan_kernel)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("fault", ["group-writable", "no digest", "tampered", "other owner",
                                   "temp fallback"])
def test_a_planted_library_is_never_loaded(scan_kernel, planted_library, tmp_path, fault):
    if fault == "other owner" and os.getuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    if fault == "temp fallback":  # the cache root cannot be created: $TMPDIR/gam-<uid>/<key>
        (tmp_path / "file").write_text("")
        os.environ["GAM_CACHE_DIR"] = str(tmp_path / "file" / "cache")
        folder = _plant(scan_kernel, planted_library, which=1)
        folder.chmod(0o777)
    else:
        folder = _plant(scan_kernel, planted_library, digest={"no digest": None,
                                                              "tampered": "wrong"}.get(fault,
                                                                                       "right"))
        if fault == "group-writable":
            folder.chmod(0o770)
        elif fault == "other owner":
            os.chown(folder, 12345, -1)
    assert _load(scan_kernel) is None  # the fake compiler cannot build a real one
    assert not (tmp_path / "ran").exists(), scan_kernel.unavailable_reason()


# ----------------------------------------------------------------------- memory and disk
def test_out_of_memory_in_training_is_one_line_and_a_retry_works(run_dir, data_dir, tmp_path,
                                                                   capsys, monkeypatch):
    import gam.training.trainer as trainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "train_step", oom)
    assert main(train_args(out, data_dir)) == 2
    one_line_error(capsys, "out of memory", "2.00 GiB", "--batch-size")
    assert not out.exists()  # failed before its first step: nothing left to refuse a retry
    monkeypatch.undo()
    assert main(train_args(out, data_dir)) == 0


def test_a_refused_new_run_leaves_the_run_already_there(run_dir, data_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.glob("[!.]*") if p.is_file()}
    assert main(train_args(run_dir, data_dir)) == 2
    one_line_error(capsys, "already holds a run")
    assert {p.name: p.read_bytes() for p in run_dir.glob("[!.]*") if p.is_file()} == before


def test_a_model_too_large_for_memory_is_refused_before_anything_is_allocated(
        run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out, data_dir, "--seq-len", "64", "--model-arg",
                           "max_seq_len=1000000000")) == 2
    one_line_error(capsys, "max_seq_len=1000000000", "GiB")
    assert not out.exists()


def _set_file_size_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_a_file_size_limit_is_one_line_naming_the_file(run_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "gam", *train_args(out, data_dir)], env=env,
                          preexec_fn=_set_file_size_limit, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "EFBIG" in last and str(out / "tokenizer.json") in last, last
    assert not out.exists()


def test_disk_errors_wrapped_by_writers_name_the_file(tmp_path):
    from gam.errors import user_error_message
    from gam.files import atomic_write

    def torch_like_writer(handle):  # torch's zip writer: the OSError becomes the context
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("unexpected pos 7680 vs 7572") from None

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "x.pt", torch_like_writer)
    message = user_error_message(caught.value)
    assert str(tmp_path / "x.pt") in message and "ENOSPC" in message
    rust = RuntimeError("Error while serializing: I/O error: File too large (os error 27)")
    assert "EFBIG" in user_error_message(rust)


# ------------------------------------------------------------------------- CLI bad values
@pytest.mark.parametrize("extra,expected", [
    (["--seed", "1180591620717411303424"], ["--seed", "1180591620717411303424"]),
    (["--vocab-size", "100000000"], ["--vocab-size", "100000000"]),
    (["--threads", "10000"], ["--threads", "10000", "core"]),
    (["--dataset", "text:/dev/zero"], ["--dataset", "/dev/zero", "not a regular file"]),
])
def test_bad_train_values_are_one_line_before_anything_is_written(tmp_path, capsys, extra,
                                                                  expected):
    out = tmp_path / "run"
    assert main(train_args(out, tmp_path, *extra)) == 2
    one_line_error(capsys, *expected)
    assert not out.exists()


def test_symlink_loops_and_undecodable_paths_are_one_line(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(train_args(tmp_path / "run", tmp_path, "--dataset", f"text:{loop}")) == 2
    one_line_error(capsys, "--dataset", "symlink loop")
    assert main(train_args(loop, tmp_path)) == 2
    one_line_error(capsys, "--out", "symlink loop")
    bad = os.fsdecode(bytes(tmp_path / "r") + b"\xff")
    assert main(train_args(Path(bad), tmp_path)) == 2
    one_line_error(capsys, "--out", "UTF-8")
    assert os.listdir(tmp_path) == ["loop"]
    assert main(["generate", str(tmp_path), "--prompt", os.fsdecode(b"\xff\xfe x")]) == 2
    one_line_error(capsys, "--prompt", "UTF-8")


@pytest.mark.parametrize("argv,expected", [
    (["scale", "--lengths", "0"], ["--lengths", "0"]),
    (["scale", "--batch-size", "-2"], ["--batch-size", "-2"]),
    (["throughput", "--lr", "nan"], ["--lr", "nan"]),
    (["decode", "--new-tokens", "0"], ["--new-tokens", "0"]),
    (["recall", "--quick", "--warmup-fraction", "2"], ["--warmup-fraction"]),
])
def test_benchmarks_refuse_nonsense_in_one_line(tmp_path, capsys, argv, expected):
    assert main(["bench", *argv, "--threads", "1", "--out", str(tmp_path / "b")]) == 2
    one_line_error(capsys, *expected)


def test_a_benchmark_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"
    assert main(["bench", "compare", "--quick", "--threads", "1", "--models", "gam",
                 "--out", str(out)]) == 2
    one_line_error(capsys, "gam bench compare: error:", str(out))


def test_an_interrupted_export_exits_130_and_leaves_no_folder(run_dir, tmp_path, capsys,
                                                               monkeypatch):
    pytest.importorskip("transformers")
    import gam.hf.export as export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.GAMForCausalLM, "save_pretrained", interrupted)
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 130
    one_line_error(capsys, "interrupted")
    assert os.listdir(tmp_path) == []  # neither the folder nor its unfinished sibling


# ----------------------------------------------------------------------------- library
def test_library_values_are_clear_value_errors():
    from gam.models.official import load_official
    from gam.models.registry import build_model

    model = build_model("gam", "tiny")
    with pytest.raises(ValueError, match="batch of 0"):
        model(torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, top_k=2.5)
    with pytest.raises(ValueError, match="not an official gam state_dict.*memory_bank"):
        load_official(build_model("transformer", "tiny").state_dict(), "gam")


def test_the_cli_rule_user_errors_one_line_bugs_a_traceback(capsys, monkeypatch):
    import gam.cli as cli
    from gam.errors import UsageError

    def usage(args):
        raise UsageError("--thing 3 must be even")

    def bug(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "cmd_eval", usage)
    assert main(["eval", "somewhere"]) == 2
    assert one_line_error(capsys) == "gam: error: --thing 3 must be even"
    monkeypatch.setattr(cli, "cmd_eval", bug)
    with pytest.raises(TypeError):
        main(["eval", "somewhere"])
