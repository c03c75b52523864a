"""``gam train --resume`` when things went wrong: a lost checkpoint folder is refused without
touching the run, a corrupted model.safetensors of a finished run is rewritten from the
checkpoint, and --max-steps / --epochs change the length of a (finished) run."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gam.cli import main
from gam.files import current_umask
from gam.training import find_checkpoint, load_checkpoint, load_run, read_metrics
from gam.training.optim import WarmupCosine


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_dir, tiny_args, session_cache_dir) -> Path:
    """A finished 4-step run whose schedule leaves the warm-up (2 steps) and decays to 0."""
    out = tmp_path_factory.mktemp("short") / "run"
    assert main(tiny_args(data_dir, out, "--max-steps", "4", "--warmup-steps", "2",
                          "--lr", "1e-3", "--threads", "1",
                          "--cache-dir", str(session_cache_dir))) == 0
    return out


def test_lost_checkpoint_folder_is_refused_and_nothing_changes(run_copy, capsys):
    shutil.rmtree(find_checkpoint(run_copy))  # latest.json still names it
    before = _files(run_copy)
    assert main(["train", "--resume", str(run_copy), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"gam: error: cannot resume {run_copy}")
    assert "nothing was changed" in err and "steps up to 6" in err
    assert _files(run_copy) == before  # metrics.jsonl and everything else kept


def test_lost_checkpoint_without_latest_json_is_refused_too(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoint")  # model.safetensors still says one was saved
    before = _files(run_copy)
    assert main(["train", "--resume", str(run_copy), "--device", "cpu", "--quiet"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert _files(run_copy) == before


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_finished_run_with_a_broken_model_file_is_repaired(run_copy, damage, capsys):
    weights = run_copy / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    metrics_before = read_metrics(run_copy)
    assert main(["train", "--resume", str(run_copy), "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "repaired" in err and "model.safetensors" in err
    model, _, _ = load_run(run_copy)
    saved = load_file(str(find_checkpoint(run_copy) / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert [r for r in read_metrics(run_copy) if r["kind"] != "resume"] == metrics_before


def test_intact_finished_run_is_not_rewritten(run_copy, capsys):
    before = (run_copy / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "--resume", str(run_copy), "--device", "cpu", "--quiet"]) == 0
    assert "repaired" not in capsys.readouterr().err
    assert (run_copy / "model.safetensors").stat().st_mtime_ns == before


def test_resume_with_max_steps_extends_a_finished_run(short_run, tmp_path, capsys):
    run = tmp_path / "extended"
    shutil.copytree(short_run, run)
    old = read_metrics(run, kind="train")
    assert [r["step"] for r in old] == [1, 2, 3, 4]
    assert main(["train", "--resume", str(run),
                 "--device", "cpu", "--max-steps", "8", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["total_steps"] == 8
    assert summary["resumed_from"] == 4
    records = read_metrics(run, kind="train")
    assert records[:4] == old  # the first four steps' records are kept as they were
    assert [r["step"] for r in records] == list(range(1, 9))
    # the cosine is recomputed for the new total: step 5 (0-based 4) of warmup 2, total 8
    expected = [1e-3 * WarmupCosine(2, 8)(s - 1) for s in range(5, 9)]
    assert [r["lr"] for r in records[4:]] == pytest.approx(expected, rel=1e-9)
    assert records[4]["lr"] > 1e-4  # not stuck at the old schedule's end (min_lr 0)
    (resume,) = read_metrics(run, kind="resume")
    assert resume == {"kind": "resume", "step": 4, "total_steps": 8,
                      "previous_total_steps": 4}
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_steps"] == 8 and config["schedule"]["total_steps"] == 8
    assert [r["step"] for r in read_metrics(run, kind="eval")][-1] == 8


def test_resume_with_epochs_drops_the_recorded_max_steps(short_run, tmp_path, capsys):
    run = tmp_path / "epochs"
    shutil.copytree(short_run, run)
    per_epoch = json.loads((run / "config.json").read_text())["schedule"]["batches_per_epoch"]
    assert main(["train", "--resume", str(run), "--device", "cpu", "--epochs", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == summary["total_steps"] == per_epoch > 4
    config = json.loads((run / "config.json").read_text())
    assert (config["train"]["epochs"], config["train"]["max_steps"]) == (1, None)


def test_resume_cannot_shorten_below_the_step_done(short_run, tmp_path, capsys):
    run = tmp_path / "short"
    shutil.copytree(short_run, run)
    before = _files(run)
    assert main(["train", "--resume", str(run),
                 "--device", "cpu", "--max-steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already at step 4" in err and "--max-steps" in err
    assert _files(run) == before


def test_finished_run_says_how_to_extend(short_run, tmp_path, capsys):
    run = tmp_path / "again"
    shutil.copytree(short_run, run)
    assert main(["train", "--resume", str(run), "--device", "cpu"]) == 0
    assert "--max-steps N (or --epochs N) with --resume" in capsys.readouterr().err


def test_other_options_are_still_refused_with_resume(short_run, capsys):
    assert main(["train", "--resume", str(short_run), "--device", "cpu", "--lr", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "--max-steps or --epochs" in err


def test_run_files_get_the_umask_mode(trained_run):
    mask = current_umask()  # the fixture's run was written under this process's umask
    ckpt = find_checkpoint(trained_run)
    for path in (trained_run / "config.json", trained_run / "model.json",
                 trained_run / "model.safetensors", trained_run / "metrics.jsonl",
                 trained_run / "checkpoint" / "latest.json", ckpt / "model.safetensors",
                 ckpt / "state.json", ckpt / "optimizer.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o777 & ~mask


def _rename_key(path: Path, outer: str | None, old: str, new: str) -> None:
    values = json.loads(path.read_text())
    holder = values if outer is None else values[outer]
    holder[old] = holder.pop(new)
    path.write_text(json.dumps(values))


def test_a_run_written_under_the_old_setting_name_loads_and_resumes(short_run, tmp_path, capsys):
    """Runs written when ``model_preset`` was called ``preset`` (config.json and the
    checkpoint's recorded settings) still load and resume."""
    run = tmp_path / "old-names"
    shutil.copytree(short_run, run)
    _rename_key(run / "config.json", None, "preset", "model_preset")
    _rename_key(find_checkpoint(run) / "state.json", "settings", "preset", "model_preset")
    model, _, config = load_run(run)
    assert config["preset"] == "tiny"
    assert main(["train", "--resume", str(run), "--device", "cpu", "--max-steps", "6",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["resumed_from"] == 4
    assert json.loads((run / "config.json").read_text())["model_preset"] == "tiny"


def test_a_run_written_with_model_overrides_loads_and_resumes(data_dir, tiny_args, tmp_path,
                                                              session_cache_dir, capsys):
    """Runs written when ``model_arg`` was called ``model_overrides`` (config.json and the
    checkpoint's recorded settings) still load and resume with their model settings."""
    run = tmp_path / "old-overrides"
    assert main(tiny_args(data_dir, run, "--max-steps", "2", "--threads", "1",
                          "--model-arg", "num_memory_slots=8",
                          "--cache-dir", str(session_cache_dir))) == 0
    capsys.readouterr()
    _rename_key(run / "config.json", None, "model_overrides", "model_arg")
    _rename_key(find_checkpoint(run) / "state.json", "settings", "model_overrides", "model_arg")
    model, _, config = load_run(run)
    assert config["model_overrides"] == {"num_memory_slots": 8}
    assert model.config.num_memory_slots == 8
    assert main(["train", "--resume", str(run), "--device", "cpu", "--max-steps", "3",
                 "--threads", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["resumed_from"] == 2
    config = json.loads((run / "config.json").read_text())
    assert config["model_arg"] == {"num_memory_slots": 8} and "model_overrides" not in config


# ------------------------------------------------------------------- per-group learning rates
@pytest.fixture(scope="module")
def s4d_run(tmp_path_factory, data_dir, tiny_args, session_cache_dir) -> Path:
    """A finished 3-step S4D run: its SSM parameters in a group capped at ssm_lr 1e-3."""
    out = tmp_path_factory.mktemp("s4d") / "run"
    assert main(tiny_args(data_dir, out, "--max-steps", "3", "--warmup-steps", "2",
                          "--lr", "3e-3", "--threads", "1",
                          "--cache-dir", str(session_cache_dir), model="s4d")) == 0
    return out


def _checkpoint_groups(run: Path) -> list[dict]:
    return load_checkpoint(find_checkpoint(run)).optimizer["param_groups"]


def test_a_resumed_s4d_run_keeps_the_capped_group(s4d_run, tmp_path, capsys):
    run = tmp_path / "s4d"
    shutil.copytree(s4d_run, run)
    assert json.loads((run / "config.json").read_text())["model_config"]["ssm_lr"] == 1e-3
    main_group, ssm = _checkpoint_groups(run)
    assert ssm["weight_decay"] == 0.0 and main_group["weight_decay"] == 0.1
    assert ssm["initial_lr"] == 1e-3 and main_group["initial_lr"] == 3e-3
    assert main(["train", "--resume", str(run), "--device", "cpu", "--max-steps", "5",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 5
    main_group, ssm = _checkpoint_groups(run)
    f = WarmupCosine(2, 5)
    assert main_group["lr"] == pytest.approx(3e-3 * f(5), abs=1e-15)
    assert ssm["lr"] == pytest.approx(1e-3 * f(5), abs=1e-15)
    assert [r["lr"] for r in read_metrics(run, kind="train")][3:] == pytest.approx(
        [3e-3 * f(s) for s in (3, 4)], rel=1e-9)


def _drop_ssm_lr(values: dict, *path: str) -> None:
    for key in path:
        values = values[key]
    del values["ssm_lr"]


def test_an_s4d_run_from_before_ssm_lr_resumes_as_it_was_trained(
        data_dir, tiny_args, session_cache_dir, tmp_path, capsys):
    """A run recorded before ``ssm_lr`` existed trained its SSM parameters with the others:
    it resumes so (one optimizer group), and its record then says ssm_lr None."""
    run = tmp_path / "old-s4d"
    assert main(tiny_args(data_dir, run, "--max-steps", "2", "--warmup-steps", "1",
                          "--threads", "1", "--cache-dir", str(session_cache_dir),
                          "--model-arg", "ssm_lr=none", model="s4d")) == 0
    for path, keys in ((run / "config.json", [("model_arg",), ("model_config",)]),
                       (run / "model.json", [("config",)]),
                       (find_checkpoint(run) / "state.json", [("settings", "model_arg")])):
        values = json.loads(path.read_text())
        for key in keys:
            _drop_ssm_lr(values, *key)
        path.write_text(json.dumps(values))
    assert len(_checkpoint_groups(run)) == 1
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--device", "cpu", "--max-steps", "3",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    assert len(_checkpoint_groups(run)) == 1
    assert json.loads((run / "config.json").read_text())["model_config"]["ssm_lr"] is None
    assert main(["train", "--resume", str(run), "--device", "cpu", "--max-steps", "4",
                 "--quiet"]) == 0  # and again, from the record that now has ssm_lr None
    assert len(_checkpoint_groups(run)) == 1


@pytest.mark.parametrize("old, new, dest, value", [
    (["--preset", "tiny"], ["--model-preset", "tiny"], "model_preset", "tiny"),
    (["--tokenizer", "paper"], ["--tokenizer-kind", "paper"], "tokenizer_kind", "paper"),
    (["--offline"], ["--no-use-hub"], "use_hub", False),
])
def test_an_old_option_still_works(old, new, dest, value):
    from gam.cli import build_parser, build_run_config
    from gam.training.options import setting_of

    for argv in (old, new):
        args = build_parser().parse_args(["train", *argv, "--out", "x"])
        assert getattr(args, dest) == value
        assert setting_of(build_run_config(args), dest) == value
