"""``gam bench <command>``: benchmarks of GAM against the Transformer and Mamba.

Each command is a module ``gam.bench.<command>`` with two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...   # its own options
    def run(args: argparse.Namespace) -> int: ...                      # exit code

and is imported only when it is asked for. The dispatcher adds the options every command
shares (``--device {auto,cpu,cuda}``, ``--threads N``, ``--out DIR``, ``--quick``, ``--seed``:
see ``gam.bench.common.add_common_arguments``) before calling ``add_arguments``, and sets
``args.command`` (the name) and ``args.argv`` (the arguments after the name) so that ``run`` can
record the exact command line. To add a command: write the module and list it in ``COMMANDS``.

Commands: scale (paper Table 2: time and memory of one block vs sequence length), decode
(cached generation speed vs context), recall (multi-query associative recall accuracy),
throughput (training tokens/s, FLOPs and MFU), compare, ablate, gates, long (long-context
language modelling and passkey retrieval).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gam.bench.common import add_common_arguments

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "scale": ("gam.bench.scale",
              "forward+backward time and peak memory of one block vs sequence length "
              "(paper Table 2)"),
    "decode": ("gam.bench.decode", "cached decoding speed (tokens/s) and memory vs context"),
    "recall": ("gam.bench.recall", "multi-query associative recall (MQAR) accuracy"),
    "listops": ("gam.bench.listops", "Long Range Arena ListOps accuracy of any model family"),
    "throughput": ("gam.bench.throughput",
                   "training tokens/s, FLOPs per token and MFU against a measured matmul peak"),
    "compare": ("gam.bench.compare", "compare trained models"),
    "ablate": ("gam.bench.ablate", "GAM ablations (paper Table 3)"),
    "gates": ("gam.bench.gates", "analysis of GAM's local/global gates"),
    "long": ("gam.bench.long",
             "long contexts: perplexity, loss by position, passkey retrieval, speed and memory "
             "at T in 1024-4096 on three corpora"),
}


def _overview() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: gam bench <command> [options]   (gam bench <command> --help for options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def load_command(name: str):
    """Import the module of a command; raise ``LookupError`` with a clear message if the
    command is unknown or its module is not installed."""
    if name not in COMMANDS:
        raise LookupError(f"unknown bench command {name!r}; expected one of "
                          f"{', '.join(COMMANDS)}")
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a dependency of the module is missing: show it as is
            raise
        raise LookupError(f"`gam bench {name}` is registered but its module {module_name} is "
                          f"not available in this installation yet") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" only where the help text does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"gam bench {name}", description=COMMANDS[name][1],
                                     formatter_class=_HelpFormatter)
    add_common_arguments(parser, name)
    module.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gam bench <command> [options]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        module = load_command(name)
    except LookupError as exc:
        print(f"gam bench: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(name, module)
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    args.command = name
    args.argv = rest
    return int(module.run(args) or 0)
