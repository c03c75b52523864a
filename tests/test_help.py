"""Every option of every ``gam`` command and ``gam bench`` command documents itself: it has a
help text, and a default other than None / False is stated in it (written out, through
``%(default)s`` or by an ``ArgumentDefaultsHelpFormatter``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from gam.bench import COMMANDS, build_parser, load_command
from gam.cli import build_parser as build_gam_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _default_texts(default: Any) -> list[str]:
    """Ways a default may be written in a help text (any one of them is enough)."""
    if isinstance(default, (list, tuple)):
        items = [str(v) for v in default]
        return [" ".join(items), ",".join(items), ", ".join(items), str(list(default))]
    if isinstance(default, Path):
        return [str(default), default.as_posix()]
    if isinstance(default, float):
        return [str(default), f"{default:g}", repr(default)]
    return [str(default)]


def undocumented_options(parser: argparse.ArgumentParser) -> list[str]:
    """``--option: why`` for every option whose help is missing or hides its default."""
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction,
                                                            argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings)
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{name}: no help text")
            continue
        text = formatter._expand_help(action)
        # what the formatter appends after the help (ArgumentDefaultsHelpFormatter)
        if hasattr(formatter, "_get_help_string"):
            text = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog,
                                                         "default": action.default}
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            continue
        if not any(t in text for t in _default_texts(default)):
            problems.append(f"{name}: default {default!r} not stated in {text!r}")
    return problems


def gam_parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_gam_parser()
    return {"gam": top, **{f"gam {n}": p for n, p in _subparsers(top).items()}}


@pytest.mark.parametrize("name", sorted(gam_parsers()))
def test_every_gam_option_states_its_default(name):
    assert undocumented_options(gam_parsers()[name]) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_bench_option_states_its_default(command):
    parser = build_parser(command, load_command(command))
    assert undocumented_options(parser) == []


def test_the_check_catches_a_hidden_default():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3, help="how many")
    parser.add_argument("--m", type=int, default=None)
    parser.add_argument("--ok", type=int, default=4, help="how many (default %(default)s)")
    problems = undocumented_options(parser)
    assert len(problems) == 2 and problems[0].startswith("--n:") and problems[1].startswith("--m")
    formatted = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    formatted.add_argument("--n", type=int, default=3, help="how many")
    assert undocumented_options(formatted) == []
