"""Subprocess workers: a command runs one configuration in a fresh
``python -m gam.bench.<command> --worker JSON`` process, which prints one
``GAM_BENCH_RESULT {json}`` line per finished record. The parent enforces a wall-clock limit
(the child's process group is killed), keeps every record printed before a timeout or a
crash, and maps a child killed by SIGKILL (the kernel's OOM killer) to status ``"oom"``.
A worker ends itself when its parent dies (killed, say, by SIGTERM, which no ``except``
sees): its parent's lock on the run's record dies with the parent, so a worker left running
would train beside the one the next command starts for the same record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from gam.bench.reports import json_safe
from gam.errors import is_oom_error
from gam.runtime import set_threads

RESULT_PREFIX = "GAM_BENCH_RESULT "
PARENT_ENV = "GAM_BENCH_PARENT_PID"  # the worker's parent, set by run_worker
ORPHAN_POLL_S = 1.0


def run_worker(module: str, payload: dict[str, Any], timeout: float | None = None
               ) -> tuple[str, list[dict[str, Any]], str | None]:
    """Run ``python -m <module> --worker <payload JSON>`` in a fresh process.

    Returns ``(status, records, error)``: status is ``ok`` (exit code 0), ``timeout`` (the
    wall-clock limit was reached: the child's process group is killed), ``oom`` (killed by
    SIGKILL, which on Linux is what the OOM killer sends) or ``error``; records are the
    ``GAM_BENCH_RESULT`` lines the child printed, kept in every case.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(payload)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[PARENT_ENV] = str(os.getpid())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    status, error = "ok", None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        status, error = "timeout", f"exceeded the limit of {timeout:g} s"
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    records = []
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            records.append(json.loads(line[len(RESULT_PREFIX):]))
    if status == "ok" and proc.returncode != 0:
        tail = (stderr or "").strip().splitlines()[-3:]
        if proc.returncode == -signal.SIGKILL:
            status = "oom"
            error = "worker killed by SIGKILL (out of memory: the kernel's OOM killer)"
        else:
            status = "error"
            error = f"worker exited with code {proc.returncode}: " + " | ".join(tail)
    return status, records, error


def merge_worker_result(row: dict[str, Any], status: str, records: list[dict[str, Any]],
                        error: str | None) -> dict[str, Any]:
    """Fold a ``run_worker`` outcome into ``row``: the last record's fields (without its
    traceback), and ``status`` / ``error`` when the worker failed or printed nothing."""
    rec = dict(records[-1]) if records else {}
    rec.pop("traceback", None)
    row.update(rec)
    if status != "ok" or not records:
        row["status"] = status if status != "ok" else "error"
        row["error"] = error or "worker printed no result"
    return row


def failure_record(exc: BaseException) -> dict[str, Any]:
    """The record of a worker whose work raised ``exc``: status ``oom`` or ``error``."""
    return {"status": "oom" if is_oom_error(exc) else "error",
            "error": f"{type(exc).__name__}: {str(exc)[:500]}",
            "traceback": traceback.format_exc()[-2000:]}


def run_in_process(fn: Callable[..., None], payload: dict[str, Any]) -> dict[str, Any]:
    """A worker's work in this process (``fn(payload, emit=...)``), its last record returned
    and a failure recorded as the worker's would be: faster to start, but a crash ends the
    caller."""
    records: list[dict[str, Any]] = []
    try:
        fn(payload, emit=records.append)
    except Exception as exc:  # noqa: BLE001 - recorded
        records.append(failure_record(exc))
    return merge_worker_result({}, "ok", records, None)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def emit(record: dict[str, Any]) -> None:
    """Worker side: report one finished record to the parent."""
    print(RESULT_PREFIX + json.dumps(json_safe(record)), flush=True)


def exit_when_orphaned(parent_pid: str | None) -> None:
    """Worker side: end this process (exit code 1) within ``ORPHAN_POLL_S`` seconds of its
    parent ``parent_pid`` dying (this process then has another parent). A no-op without a pid
    (a worker started by hand)."""
    if not parent_pid or not parent_pid.isdigit():
        return
    parent = int(parent_pid)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os._exit(1)  # no cleanup: the records this worker printed have no reader left

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


def worker_main(fn: Callable[[dict[str, Any]], None], argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gam.bench.<command> --worker JSON``: set threads, call
    ``fn(payload)`` (which calls ``emit``); an exception that escapes is reported as one record
    with status ``oom`` or ``error``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m gam.bench.<command> --worker PAYLOAD_JSON "
              "(internal; use `gam bench <command>`)", file=sys.stderr)
        return 2
    payload = json.loads(argv[1])
    exit_when_orphaned(os.environ.get(PARENT_ENV))
    set_threads(payload.get("threads"), follow_load=False)
    try:
        fn(payload)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        emit(failure_record(exc))
        return 0
    return 0
