"""Fixtures for the training tests.

Every run is tiny (``--preset tiny``, a 512-token tokenizer, a few hundred WikiText-2 rows) so
a whole training takes about a second. The caches live in one temporary folder for the session
(``$GAM_CACHE_DIR``), so the tokenizer is trained once. Real-data tests get the shared data
folder from the ``data_dir`` fixture (``../shared/data``, passed with --data-dir) and skip when
there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

VOCAB = 512


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gam-cache")


@pytest.fixture(scope="module", autouse=True)
def private_environment(session_cache_dir, private_gam_environment):
    """One private tokenizer / token-id cache shared by the training tests; no $GAM_DATA_DIR;
    the hub never contacted. Restored after each module, so other test folders are unaffected."""
    with private_gam_environment(session_cache_dir) as cache:
        yield cache


def tiny_train_args(data_dir: Path, out: Path, *extra: str, model: str = "gam") -> list[str]:
    return ["train", "--model", model, "--preset", "tiny", "--dataset", "wikitext2",
            "--data-dir", str(data_dir), "--max-train-rows", "400", "--max-val-rows", "40",
            "--vocab-size", str(VOCAB), "--batch-size", "8", "--log-every", "1", "--quiet",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def tiny_args():
    """``tiny_args(data_dir, out, *extra)``: argv of a tiny ``gam train`` run."""
    return tiny_train_args


def run_gam(args: list[str], timeout: float = 240, env: dict[str, str | None] | None = None,
            module: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gam", *args] if module else [sys.executable, *args]
    # no GPU for a CPU test's subprocess: `gam` on "auto" would take one where present
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset it
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _max_logged_step(run: Path) -> int:
    """The highest step in ``run``'s metrics.jsonl so far (0 before any; a line being written is
    skipped)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    best = 0
    for line in lines:
        try:
            best = max(best, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, ValueError):
            pass
    return best


def run_and_kill_at_step(args: list[str], run: Path, step: int,
                         kill: Callable[[subprocess.Popen], None], timeout: float = 240
                         ) -> tuple[int, int]:
    """Run ``python ARGS`` (training into ``run``), ``kill(process)`` once it has logged
    ``step``; return its exit status and the highest step it logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    deadline = time.monotonic() + timeout
    with subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env) as proc:
        try:
            while _max_logged_step(run) < step:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, f"the run did not reach step {step}"
                time.sleep(0.01)
            kill(proc)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                kill(proc)
                proc.wait()
    return proc.returncode, _max_logged_step(run)


@pytest.fixture(scope="session")
def kill_at_step():
    """``kill_at_step(args, run, step, kill)``: :func:`run_and_kill_at_step`."""
    return run_and_kill_at_step


@pytest.fixture(scope="session")
def gam_subprocess():
    """``gam_subprocess(args, timeout=..., env=..., module=True)``: run ``python -m gam``."""
    return run_gam


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir, session_cache_dir) -> Path:
    """A finished tiny GAM run (6 steps, evaluations at steps 3 and 6, dropout on)."""
    from gam.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny-gam"
    code = main(tiny_train_args(data_dir, out, "--max-steps", "6", "--save-every", "3",
                                "--eval-every", "3", "--dropout", "0.1", "--threads", "1",
                                # session fixtures are set up before the module environment
                                "--cache-dir", str(session_cache_dir)))
    assert code == 0
    return out
