"""gam.bench.workers: a worker does not outlive the command that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and parents")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_a_worker_ends_when_the_command_that_started_it_is_killed(tmp_path: Path) -> None:
    # a worker module that records its pid and would otherwise run for a minute
    (tmp_path / "sleepy_worker.py").write_text(textwrap.dedent("""
        import os, sys, time
        from gam.bench.workers import worker_main

        def work(payload):
            open(payload["pid_file"], "w").write(str(os.getpid()))
            time.sleep(60)

        if __name__ == "__main__":
            sys.exit(worker_main(work))
    """))
    pid_file = tmp_path / "worker.pid"
    parent_code = ("from gam.bench.workers import run_worker; "
                   f"run_worker('sleepy_worker', {{'pid_file': {str(pid_file)!r}}})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.send_signal(signal.SIGTERM)  # no `except` in the parent sees this one
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived the command that started it"
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
