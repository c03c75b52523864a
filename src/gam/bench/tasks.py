"""The benchmark-task layer that ``gam bench recall``, ``listops`` and ``long`` share: what a
task benchmark is made of besides its own data, model and measurements.

- **model specs**: ``NAME[:KEY=VALUE,...]`` (``parse_model_spec``), checked against the
  registry before anything runs (``check_model_names``), and the per-family sizes a task gives
  every family that has the field (``family_overrides``);
- **protocol**: a frozen dataclass of everything a configuration's numbers depend on, a named
  preset with the command line's overrides applied (``resolve_preset``);
- **resumable configurations** (``Configuration``): one JSON record per configuration,
  ``<id>.json``, written as soon as it finishes with the key of settings it was made with, and
  reused when a later command asks for the same key; while it runs, ``<id>.lock`` keeps a
  second process off it, ``<id>.log`` holds its progress, and a task that checkpoints resumes
  an interrupted configuration from ``<id>.ckpt`` (``save_checkpoint`` / ``load_checkpoint``:
  plain data, key-checked, never unpickled code).

The training runs of ``compare``, ``ablate`` and ``long`` are run folders of the training
runner (``gam.bench.runs``), which resumes them itself; ``long``'s evaluation of such a run is
a ``Configuration``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar, get_args, get_type_hints

import torch

from gam.bench.workers import merge_worker_result, run_worker
from gam.files import LockHeldError, atomic_write, atomic_write_json, hold_lock
from gam.models.registry import MODELS, config_class
from gam.training.argtypes import parse_model_arg

P = TypeVar("P")


# ----------------------------------------------------------------------------- model specs
def check_model_names(names: Iterable[str], extra: Sequence[str] = ()) -> None:
    """A one-line ValueError for a name that is neither registered nor in ``extra``."""
    for name in names:
        if name not in MODELS and name not in extra:
            expected = f"{', '.join(extra)} or one of " if extra else "one of "
            raise ValueError(f"unknown model {name!r}; expected {expected}{sorted(MODELS)}")


def check_distinct(models: Sequence[str]) -> None:
    if len(set(models)) != len(models):
        raise ValueError(f"--models lists a model twice: {list(models)}")


def parse_model_spec(text: str, extra: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]`` -> (name, overrides); a one-line ValueError if malformed or the
    name is unknown (``extra``: names a task builds itself)."""
    name, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        try:
            key, value = parse_model_arg(item)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"model {text!r}: {exc}") from None
        overrides[key] = value
    check_model_names([name], extra)
    return name, overrides


def family_overrides(name: str, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``wanted`` that family ``name``'s config has (GAM's memory slots, Mamba's
    d_state, ...): one table serves every family."""
    known = {f.name for f in fields(config_class(name))}
    return {k: v for k, v in wanted.items() if k in known}


# -------------------------------------------------------------------------------- protocol
def add_protocol_options(group: Any, protocol: type, helps: Mapping[str, str],
                         flags: Mapping[str, str] | None = None,
                         choices: Mapping[str, Sequence[Any]] | None = None) -> None:
    """One option per field of ``helps`` of the protocol dataclass: ``--field-name`` (or
    ``flags[field]``), of the field's type, default None (``resolve_preset`` then keeps the
    preset's value); read back with ``protocol_overrides``."""
    hints = get_type_hints(protocol)
    for name, text in helps.items():
        kind = hints[name]
        if kind not in (int, float, str):  # ``float | None``: the type that is not None
            kind = next(a for a in get_args(kind) if a is not type(None))
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        extra = {"choices": choices[name]} if choices and name in choices else {"type": kind}
        group.add_argument(flag, dest=name, default=None, help=text, **extra)


def add_rerun_options(parser: argparse.ArgumentParser, records: str) -> None:
    """``--retrain`` and ``--report-only`` of a task whose finished configurations are kept
    in ``records`` (e.g. OUT/configs); ``check_rerun_options`` refuses the two together."""
    parser.add_argument("--retrain", action="store_true",
                        help=f"train every configuration again instead of reusing the "
                             f"finished ones in {records} (default: reuse)")
    parser.add_argument("--report-only", action="store_true",
                        help=f"train nothing: report the finished configurations in "
                             f"{records} and list the others as 'not run' (default: "
                             f"train them)")


def check_rerun_options(args: argparse.Namespace) -> None:
    """A one-line ValueError when ``--retrain`` and ``--report-only`` are both given."""
    if args.retrain and args.report_only:
        raise ValueError("--retrain and --report-only contradict each other; give one")


def protocol_overrides(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The values of ``add_protocol_options``' options (None where not given)."""
    return {name: getattr(args, name, None) for name in names}


def resolve_preset(presets: Mapping[str, P], name: str, overrides: Mapping[str, Any],
                   at_least_one: Sequence[str] = ()) -> P:
    """Preset ``name`` with the overrides that are not None; a one-line ValueError naming the
    option when a field of ``at_least_one`` is below 1."""
    protocol = replace(presets[name], **{k: v for k, v in overrides.items() if v is not None})
    for field_name in at_least_one:
        if getattr(protocol, field_name) < 1:
            raise ValueError(f"--{field_name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(protocol, field_name)}")
    return protocol


# -------------------------------------------------------------------------- configurations
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is absent or unreadable (then redone)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def progress_log(payload: dict[str, Any]) -> Callable[[str], None]:
    """Worker side: a function that appends a line to the configuration's ``<id>.log`` (the
    parent reads the worker's stdout only at the end)."""
    log_file = payload.get("log_file")

    def log(line: str) -> None:
        if log_file:
            with open(log_file, "a") as f:
                f.write(line + "\n")

    return log


@dataclass
class Configuration:
    """One resumable configuration: its record ``path`` (``<id>.json``) and the ``key`` of
    settings its numbers depend on. ``nested``: the record is ``{"key", "result"}`` instead of
    ``{"key", **row}``; ``logged``: the worker's progress goes to ``<id>.log``."""

    path: Path
    key: Any
    nested: bool = False
    logged: bool = True

    @property
    def checkpoint(self) -> Path:
        return self.path.with_suffix(".ckpt")

    @property
    def log_file(self) -> Path:
        return self.path.with_suffix(".log")

    def finished(self) -> dict[str, Any] | None:
        """The finished row recorded with this key (without it), or None."""
        record = read_json(self.path)
        if record is None or record.get("key") != self.key:
            return None
        if self.nested:
            return record.get("result")
        return {k: v for k, v in record.items() if k != "key"} if record.get(
            "status") == "ok" else None

    def save(self, row: dict[str, Any]) -> None:
        record = {"key": self.key, "result": row} if self.nested else {"key": self.key, **row}
        atomic_write_json(self.path, record)

    def run(self, module: str, payload: dict[str, Any], timeout: float | None = None,
            in_process: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
            resumable: bool = False, retrain: bool = False, record: bool = True
            ) -> dict[str, Any]:
        """Run the configuration in a ``python -m <module> --worker`` process (or
        ``in_process(payload)``) and return its row (``action`` trained, ``wall_seconds``);
        a finished one is recorded (``record``: else the caller records it, as it keeps
        it). ``resumable``: the worker gets ``checkpoint`` and
        continues from it (``retrain``: starts again). The ``.lock`` is held throughout: a
        configuration another process runs is skipped (status "not run"), its log and
        checkpoint untouched."""
        with ExitStack() as stack:
            try:
                stack.enter_context(hold_lock(self.path.with_suffix(".lock")))
            except LockHeldError as exc:
                return {"status": "not run", "action": "skipped",
                        "error": f"being run by another process (pid {exc.holder})"}
            payload = dict(payload)
            if resumable:
                payload["checkpoint"] = str(self.checkpoint)
            if not (resumable and self.checkpoint.is_file()) or retrain:
                self.checkpoint.unlink(missing_ok=True)
                if self.logged:  # a resumed configuration keeps its log
                    self.log_file.write_text("")
            if self.logged:
                payload["log_file"] = str(self.log_file)
            t0 = time.perf_counter()
            if in_process is not None:
                row = in_process(payload)
            else:
                row = merge_worker_result({}, *run_worker(module, payload, timeout=timeout))
            row.pop("traceback", None)
            row.update(action="trained", wall_seconds=time.perf_counter() - t0)
            if record and row["status"] == "ok":
                self.save(row)
            return row


# ----------------------------------------------------------------------------- checkpoints
def key_text(key: Any) -> str:
    """A configuration's key as canonical JSON (tuples and lists compare equal)."""
    return json.dumps(key, sort_keys=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``state`` (tensors, numbers, lists, dicts and its ``key``) to ``path``, atomically;
    the key as JSON text, so that it loads with ``weights_only=True`` whatever it holds."""
    state = {**state, "key": key_text(state["key"])}
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path | None, key: Any) -> dict[str, Any] | None:
    """The saved state of this configuration, or None (no file, another key, unreadable).

    Read with ``weights_only=True``: a file in the output folder is data, never code (a
    planted pickle is refused, not run); its key must equal this configuration's before any
    of it is used."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - damaged or not a plain-data checkpoint: start again
        return None
    if not isinstance(state, dict) or state.get("key") != key_text(key):
        return None
    return state
