"""A run killed with SIGKILL between checkpoints and resumed reproduces the uninterrupted run's
per-step losses bit for bit (CPU, dropout on)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from gam.training import find_checkpoint, load_checkpoint, read_metrics

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

STEPS = 40


def _losses(run: Path) -> dict[int, float]:
    records = read_metrics(run, kind="train")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records}


def test_resume_after_sigkill_is_bit_exact(tmp_path, data_dir, tiny_args, gam_subprocess,
                                           kill_at_step):
    extra = ("--max-steps", str(STEPS), "--save-every", "3", "--eval-every", "7",
             "--dropout", "0.1", "--batch-size", "16", "--threads", "1")
    full = tmp_path / "uninterrupted"
    done = gam_subprocess(tiny_args(data_dir, full, *extra))
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    status, reached = kill_at_step(["-m", "gam", *tiny_args(data_dir, killed, *extra)], killed,
                                   5, lambda proc: proc.send_signal(signal.SIGKILL))
    assert status == -signal.SIGKILL
    assert reached < STEPS, "the run finished before it could be killed"
    checkpoint_step = load_checkpoint(find_checkpoint(killed)).state.step
    assert 3 <= checkpoint_step <= reached and checkpoint_step % 3 == 0

    # no --threads and no OMP_NUM_THREADS: the run's recorded thread count (1) is reused
    resumed = gam_subprocess(["train", "--resume", str(killed), "--quiet", "--device", "cpu"],
                             env={"OMP_NUM_THREADS": None})
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == checkpoint_step and summary["step"] == STEPS

    expected, got = _losses(full), _losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit for bit: float equality of every step's loss
    evals = lambda run: [(r["step"], r["val_loss"]) for r in read_metrics(run, kind="eval")]  # noqa: E731
    assert evals(killed) == evals(full)
    assert [r["step"] for r in read_metrics(killed, kind="resume")] == [checkpoint_step]
