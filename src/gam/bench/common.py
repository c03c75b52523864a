"""What every ``gam bench`` command shares: its common options (``add_common_arguments``,
``add_model_arguments``), thread setup, model availability and one-line errors; and how a
measuring command (decode, scale, throughput) starts (``setup``) and ends
(``write_measurements``).

The other shared helpers live in the modules that do each job; import them from there:

- ``gam.runtime``: devices (``resolve_device``, ``synchronize``), dtypes (``DTYPES``);
- ``gam.bench.measure``: timing (``time_fn``), memory (``MemoryMeter``), rlimits, fits;
- ``gam.bench.environment``: the environment of a run and the command line;
- ``gam.bench.reports``: ``results.json`` / ``results.md``, Markdown tables, figures;
- ``gam.bench.workers``: subprocess workers (``run_worker`` / ``worker_main`` / ``emit``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gam.bench.environment import command_line, environment, finish_environment
from gam.bench.reports import write_report
from gam.errors import one_line
from gam.models.registry import config_class, model_config
from gam.runtime import TF32_ENV, resolve_device, set_threads
from gam.training.argtypes import (
    output_folder,
    parse_model_arg,
    positive_int,
    seed,
    thread_count,
)
from gam.training.config import DEVICES


# ----------------------------------------------------------------------------- arguments
def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options every command takes; the dispatcher adds them before the command's own."""
    group = parser.add_argument_group("common options")
    group.add_argument("--device", choices=DEVICES, default="auto",
                       help="auto = cuda if available, else cpu (default: auto)")
    group.add_argument("--threads", type=thread_count, default=None, metavar="N",
                       help="torch.set_num_threads(N) in every process of the run (default: "
                            "torch's default); reported in results.json")
    group.add_argument("--out", type=output_folder, default=Path("runs") / "bench" / command,
                       metavar="DIR", help=f"output folder for results.json, results.md and "
                                           f"PNGs (default: runs/bench/{command})")
    group.add_argument("--quick", action="store_true",
                       help="a small version of the benchmark (a few minutes on a CPU)")
    group.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    group.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                       help="TF32 matmuls for float32 on CUDA (default: on, unless GAM_TF32=0; "
                            "recorded in results.json)")


def add_model_preset_argument(parser: argparse.ArgumentParser, whose: str) -> None:
    """--model-preset (and its former name --preset): the build_model size preset."""
    parser.add_argument("--model-preset", default="paper",
                        help=f"size preset {whose}: paper, cpu-small or tiny (default: "
                             "%(default)s)")
    parser.add_argument("--preset", dest="model_preset", default=argparse.SUPPRESS,
                        metavar="NAME", help="former name of --model-preset")


def add_model_arguments(parser: argparse.ArgumentParser, default_models: list[str],
                        models_help: str = "build_model names") -> None:
    """--models, --model-preset, --d-model and --n-layers of the commands that time models."""
    parser.add_argument("--models", nargs="+", default=default_models, metavar="NAME",
                        help=models_help)
    add_model_preset_argument(parser, "of every model")
    parser.add_argument("--d-model", type=positive_int, default=None,
                        help="override d_model (default: the preset's)")
    parser.add_argument("--n-layers", type=positive_int, default=None,
                        help="override n_layers (default: the preset's)")
    parser.add_argument("--model-arg", action="append", type=parse_model_arg, default=[],
                        metavar="KEY=VALUE", dest="model_args",
                        help="a model config field for every model, repeatable (e.g. "
                             "--model-arg num_memory_slots=1024); as `gam train --model-arg`")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides of ``add_model_arguments``: ``--model-arg`` fields, then
    ``--d-model`` / ``--n-layers`` where given."""
    overrides = dict(args.model_args)
    overrides.update({k: v for k, v in (("d_model", args.d_model), ("n_layers", args.n_layers))
                      if v is not None})
    return overrides


def overrides_text(overrides: dict[str, Any]) -> str:
    """``", key=value, ..."`` for a report's title; empty without overrides."""
    return "".join(f", {k}={v}" for k, v in overrides.items())


def model_configs(command: str, models: list[str], preset: str, overrides: dict[str, Any]
                  ) -> dict[str, dict[str, Any]] | None:
    """Each buildable model's config with ``overrides``, checked before anything is timed;
    None (after a one-line error naming the bad setting) when an override does not fit."""
    configs = {}
    for model in models:
        if model_available(model) is None:
            try:
                configs[model] = model_config(model, preset, **overrides).to_dict()
            except (TypeError, ValueError) as exc:
                print(f"gam bench {command}: error: {error_text(exc)}", file=sys.stderr)
                return None
    return configs


# ------------------------------------------------------------------------- device, threads
def setup(args: argparse.Namespace) -> tuple[torch.device, int, str, dict[str, Any]]:
    """What a measuring command starts with: ``(device, threads, command line, environment)``
    from ``--device``, ``--threads`` and the arguments as typed."""
    if getattr(args, "tf32", None) is not None:  # the worker processes inherit it
        os.environ[TF32_ENV] = "1" if args.tf32 else "0"
    device = resolve_device(args.device)
    threads = setup_threads(args.threads)
    return device, threads, command_line(args.command, args.argv), environment(device, threads)


def write_measurements(args: argparse.Namespace, command: str, env: dict[str, Any],
                       settings: dict[str, Any], runs: list[dict[str, Any]],
                       markdown: Callable[[dict[str, Any]], str],
                       plot: Callable[[dict[str, Any], Path], Path | None], figure: str,
                       **extra: Any) -> dict[str, Any]:
    """What a measuring command ends with (``setup``'s counterpart): its ``results.json``
    (the command line; the settings every one records, ``--models``, ``--model-preset``,
    ``--max-seconds``, ``--quick`` and ``--seed``, then its own ``settings``; the ``runs``, the
    ``extra`` entries and the environment as it ends), ``results.md`` and the figure
    ``OUT/<figure>`` drawn by ``plot(results, path)``. Returns the results."""
    results = {
        "command": command,
        "settings": {"models": list(args.models), "preset": args.model_preset,
                     "max_seconds": args.max_seconds, "quick": args.quick, "seed": args.seed,
                     **settings},
        "runs": runs,
        **extra,
        "environment": finish_environment(env),
    }
    write_report(args.out, results, markdown, [lambda out: plot(results, out / figure)],
                 summary=False)
    return results


def setup_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (if given) and return the number in use (torch's default
    when None: a measurement does not adapt itself to the load)."""
    return set_threads(threads, follow_load=False)


def model_available(name: str) -> str | None:
    """None if ``build_model(name)`` can be imported, else the reason (e.g. a family whose
    module is not written yet)."""
    try:
        config_class(name)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


error_text = one_line  # an error as one line for a command-line user (gam.errors)
