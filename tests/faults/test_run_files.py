"""Fault injection on a run's files: a run never silently uses (or records) a file that is not
its own, and hand-edited or half-written files give one-line errors, never a traceback or a hang.

One tiny GAM run (and one Transformer run, for its model files) is trained per module; every
test works on a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gam.cli import main
from gam.data import load_corpus, train_tokenizer
from gam.training import find_checkpoint, load_run, read_metrics

VOCAB = 512


def _train_args(data_dir: Path, out: Path, cache: Path, model: str = "gam") -> list[str]:
    return ["train", "--model", model, "--preset", "tiny", "--dataset", "wikitext2",
            "--data-dir", str(data_dir), "--max-train-rows", "400", "--max-val-rows", "40",
            "--vocab-size", str(VOCAB), "--batch-size", "8", "--log-every", "1", "--quiet",
            "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--threads", "1",
            "--cache-dir", str(cache), "--out", str(out)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, private_gam_environment):
    with private_gam_environment(tmp_path_factory.mktemp("gam-cache")) as folder:
        yield folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, cache) -> dict[str, Path]:
    """A finished 6-step GAM run (checkpoints at 3 and 6) and a Transformer run like it."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for model in ("gam", "transformer"):
        assert main(_train_args(data_dir, root / model, cache, model)) == 0
        made[model] = root / model
    return made


@pytest.fixture
def run(runs, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(runs["gam"], copy)
    return copy


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _refused(run: Path, argv: list[str], capsys, *fragments: str) -> str:
    """``gam ARGV`` fails with a one-line error holding ``fragments`` and changes nothing."""
    before = _files(run)
    assert main(argv) == 2
    err = _one_line_error(capsys, *fragments)
    assert _files(run) == before
    return err


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _resume(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--quiet"]


def _eval(run: Path, *extra: str) -> list[str]:
    return ["eval", str(run), "--threads", "1", "--quiet", *extra]


# ----------------------------------------------------------------------------- the record
def test_a_run_records_what_its_files_must_be(runs, data_dir):
    from gam.files import sha256_file

    run = runs["gam"]
    config = json.loads((run / "config.json").read_text())
    assert config["tokenizer"]["sha256"] == sha256_file(run / "tokenizer.json")
    assert config["tokenizer"]["actual_vocab_size"] == VOCAB
    assert set(config["data"]["tokens"]) == {"train", "valid"}
    assert set(config["data"]["fingerprints"]) == {"train", "valid", "test"}
    valid = data_dir / "wikitext-2-raw" / "wiki.valid.raw.xz"
    assert Path(config["data"]["files"]["valid"]) == valid.resolve()
    state = json.loads((find_checkpoint(run) / "state.json").read_text())
    assert state["settings"]["train"] == config["train"]


# ------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def other_tokenizer(data_dir, cache) -> bytes:
    """Another run's tokenizer.json of the same vocabulary size (trained on other rows)."""
    corpus = load_corpus("wikitext2", data_dir, max_train_rows=300, max_val_rows=40)
    tokenizer = train_tokenizer(corpus, vocab_size=VOCAB, cache_dir=cache)
    assert tokenizer.get_vocab_size(with_added_tokens=True) == VOCAB
    return tokenizer.to_str(pretty=True).encode()


@pytest.mark.parametrize("command", ["eval", "generate", "resume", "export"])
def test_another_runs_tokenizer_is_refused(run, other_tokenizer, command, capsys, tmp_path):
    (run / "tokenizer.json").write_bytes(other_tokenizer)
    if command == "export":
        pytest.importorskip("transformers")
        from gam.hf.export import main as export_main

        assert export_main([str(run), str(tmp_path / "hf")]) == 1
        _one_line_error(capsys, "tokenizer.json is not this run's tokenizer", "sha256")
        assert not (tmp_path / "hf").exists()
        return
    argv = {"eval": _eval(run), "generate": ["generate", str(run), "--max-new-tokens", "3"],
            "resume": _resume(run)}[command]
    _refused(run, argv, capsys, f"tokenizer {run / 'tokenizer.json'}", "sha256")


def test_a_run_without_a_recorded_tokenizer_hash_still_loads_and_is_checked_by_counts(
        run, other_tokenizer, capsys):
    # a run made before the hash was recorded
    _edit_json(run / "config.json", lambda c: c["tokenizer"].pop("sha256"))
    model, tokenizer, _ = load_run(run)
    assert tokenizer.get_vocab_size() == VOCAB
    (run / "tokenizer.json").write_bytes(other_tokenizer)
    _refused(run, _resume(run), capsys, f"tokenizer {run / 'tokenizer.json'}",
             "tokens, the run recorded")
    _refused(run, _eval(run), capsys, "tokenizer", "the run recorded")


# ---------------------------------------------------------------------------------- model
def test_another_familys_model_files_are_refused(run, runs, capsys, tmp_path):
    for name in ("model.json", "model.safetensors"):
        shutil.copy(runs["transformer"] / name, run / name)
    _refused(run, _eval(run), capsys, "model.json holds a 'transformer' model",
             "records a 'gam' run")
    pytest.importorskip("transformers")
    from gam.hf.export import main as export_main

    assert export_main([str(run), str(tmp_path / "hf")]) == 1
    _one_line_error(capsys, "'transformer' model")


def test_resume_rewrites_another_familys_model_files_from_the_checkpoint(run, runs, capsys):
    for name in ("model.json", "model.safetensors"):
        shutil.copy(runs["transformer"] / name, run / name)
    assert main(_resume(run)) == 0
    assert "repaired" in capsys.readouterr().err
    model, _, _ = load_run(run)
    assert model.model_name == "gam"


# ----------------------------------------------------------------- checkpoint and metrics
def test_resume_without_checkpoint_and_model_files_is_refused(run, capsys):
    shutil.rmtree(run / "checkpoint")
    for name in ("model.json", "model.safetensors"):
        (run / name).unlink()
    _refused(run, _resume(run), capsys, "cannot resume", "steps up to 6")


def test_latest_json_leading_into_another_run_is_refused(run, runs, capsys):
    other = find_checkpoint(runs["transformer"])
    escape = os.path.relpath(other, run / "checkpoint")
    assert escape.startswith("..")
    (run / "checkpoint" / "latest.json").write_text(json.dumps({"dir": escape, "step": 6}))
    _refused(run, _resume(run), capsys, "latest.json names", "inside")


def test_a_corrupt_metrics_line_is_kept_and_reported(run, capsys, caplog):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:10]
    path.write_text("\n".join(lines) + "\n")
    _refused(run, _resume(run), capsys, f"{path} line 3")
    with caplog.at_level("WARNING"):
        assert len(read_metrics(run)) == len(lines) - 1
    assert f"{path} line(s) 3" in caplog.text


def test_only_a_torn_last_metrics_line_is_dropped(run):
    path = run / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text + '{"kind": "train", "st')  # a kill while a record was written
    assert main(_resume(run)) == 0
    assert path.read_text().startswith(text)
    assert '"st\n' not in path.read_text()


# ---------------------------------------------------------------------- settings (config)
@pytest.mark.parametrize(("key", "value"), [("lr", 1e-2), ("seed", 7)])
def test_an_edited_setting_is_refused_on_resume(run, key, value, capsys):
    _edit_json(run / "config.json", lambda c: c["train"].update({key: value}))
    _refused(run, _resume(run), capsys, f"train.{key} {value!r}", "trained with",
             "--max-steps")


_EDITS = [  # (file, edit, what the error says, the commands that read the file)
    ("config.json", lambda c: c.update(data=[]), "data must be an object", "resume eval"),
    ("config.json", lambda c: c.update(model_arg=["x"]), "model_arg must be",
     "resume eval"),
    ("config.json", lambda c: c["tokenizer"].update(actual_vocab_size="10000"),
     "tokenizer.actual_vocab_size must be a positive integer", "resume eval"),
    ("config.json", lambda c: c["train"].update(batch_size="8"), "batch_size", "resume eval"),
    ("state.json", lambda s: s.update(step="60"), "step must be an integer", "resume"),
    # resume rewrites a damaged model.json from the checkpoint (test_resume_repair.py)
    ("model.json", lambda m: m.update(config=[1]), "'config' must be a JSON object", "eval"),
]


@pytest.mark.parametrize(("file", "edit", "fragment", "command"), [
    (file, edit, fragment, command) for file, edit, fragment, commands in _EDITS
    for command in commands.split()])
def test_hand_edited_run_files_give_one_line_errors(run, file, edit, fragment, command,
                                                    capsys):
    path = find_checkpoint(run) / file if file == "state.json" else run / file
    _edit_json(path, edit)
    err = _refused(run, _resume(run) if command == "resume" else _eval(run), capsys, fragment)
    assert file in err


def test_a_data_position_past_the_epoch_is_refused_not_looped_on(run, gam_env):
    path = find_checkpoint(run) / "state.json"
    _edit_json(path, lambda s: s.update(batch_in_epoch=100000))
    # a run with steps left to train (a finished one would not read the position)
    done = subprocess.run([sys.executable, "-m", "gam", *_resume(run), "--max-steps", "8"],
                          capture_output=True, text=True, timeout=180, env=gam_env)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "batch_in_epoch 100000" in err and str(path) in err


@pytest.fixture
def gam_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------- eval data
@pytest.fixture
def other_valid_text(data_dir, tmp_path) -> Path:
    """A data folder whose wikitext-2-raw holds the run's .xz files and, beside the valid one,
    a plain wiki.valid.raw with other text (read first: the plain copy wins)."""
    folder = tmp_path / "data" / "wikitext-2-raw"
    folder.mkdir(parents=True)
    for source in (data_dir / "wikitext-2-raw").iterdir():
        (folder / source.name).symlink_to(source)
    (folder / "wiki.valid.raw").write_text(" = Other = \n\n Some other text .\n" * 30)
    return folder.parent


@pytest.mark.parametrize("extra", [(), ("--max-val-rows", "20")])
def test_other_evaluation_data_is_refused_naming_both_files(run, other_valid_text, extra,
                                                            capsys):
    _refused(run, _eval(run, "--data-dir", str(other_valid_text), *extra), capsys,
             f"{other_valid_text}/wikitext-2-raw/wiki.valid.raw ", "wiki.valid.raw.xz")


def test_other_validation_data_is_refused_on_resume(run, other_valid_text, capsys):
    _refused(run, [*_resume(run), "--data-dir", str(other_valid_text)], capsys,
             "wiki.valid.raw ", "wiki.valid.raw.xz")


def test_the_runs_own_data_evaluates_with_another_row_cut(run, capsys):
    assert main(_eval(run, "--max-val-rows", "20")) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


# ------------------------------------------------------------------------ kills mid-save
_SAVE_FOREVER = """
import sys, torch
from gam.models.io import save_weights
model = torch.nn.Linear(2000, 4000)  # 32 MB: each save takes a while
while True:
    save_weights(model, sys.argv[1])
"""


def _kill_while_saving(run: Path, env: dict[str, str]) -> set[str]:
    """SIGKILL a process that saves model.safetensors into ``run`` over and over, at a moment
    its temporary files exist; returns their names."""
    for _ in range(5):
        with subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER,
                               str(run / "model.safetensors")], env=env) as proc:
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and proc.poll() is None:
                    temps = {p.name for p in run.iterdir() if p.name.startswith(".")
                             and p.name != ".lock"}
                    if len(temps) >= 2:  # ours (.model.safetensors.*.tmp) and safetensors'
                        proc.send_signal(signal.SIGKILL)
                        break
                    time.sleep(0.001)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        left = {p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"}
        if len(left) >= 2:
            return left
    pytest.fail("never caught a save with its temporary files")


def test_a_kill_mid_save_leaves_nothing_once_resumed(run, gam_env, capsys):
    (run / "notes.tmp").write_text("the user's")  # not ours: kept
    left = _kill_while_saving(run, gam_env)
    assert any(name.startswith(".model.safetensors.") and name.endswith(".tmp")
               for name in left), left
    assert main(_resume(run)) == 0
    err = capsys.readouterr().err
    assert "temporary file(s) left by an interrupted save" in err
    assert {p.name for p in run.iterdir() if p.name.startswith(".")} <= {".lock"}
    assert (run / "notes.tmp").read_text() == "the user's"
    model, _, _ = load_run(run)  # the killed saves' weights were replaced by the checkpoint's
    assert model.model_name == "gam"
