"""The flat view of the run settings of :mod:`gam.training.config` and the command-line
options derived from them: ``gam train``'s options (:func:`add_setting_arguments`), the
benchmark protocols' overrides (:func:`add_override_arguments`), and ``RunConfig`` <-> flat
settings (:func:`run_config_from_settings`, :func:`setting_of`).

A setting's *key* is its flat name across the sections of ``RunConfig`` (``batch_size``,
``tokenizer_kind`` for ``TokenizerConfig.kind``, ``tokenizer_on_all_splits``...): the
``gam train`` option's ``dest`` and a protocol's override name.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection, Iterator, Mapping
from dataclasses import MISSING, fields
from typing import Any

from gam.training.argtypes import optional_positive_int
from gam.training.config import (
    DataConfig,
    RunConfig,
    RuntimeOptions,
    TokenizerConfig,
    TrainConfig,
)

_SECTIONS: tuple[tuple[str, type], ...] = (
    ("data", DataConfig), ("tokenizer", TokenizerConfig), ("train", TrainConfig))


def setting_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def setting_flag(f: dataclasses.Field) -> str:
    flag = f.metadata.get("flag")
    return "--" + f.name.replace("_", "-") if flag is None else flag


def run_settings() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every setting of a ``RunConfig``: flat key -> (section or None, field)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in fields(RunConfig):
        if f.metadata:
            out[setting_key(f)] = (None, f)
    for section, cls in _SECTIONS:
        for f in fields(cls):
            out[setting_key(f)] = (section, f)
    return out


def overridable_keys(exclude: Collection[str] = ()) -> tuple[str, ...]:
    """The keys of the settings a benchmark protocol may override (those with an ``override``
    text), in definition order, less ``exclude``."""
    unknown = set(exclude) - set(run_settings())
    if unknown:
        raise KeyError(f"no such settings: {sorted(unknown)}")
    return tuple(key for key, (_, f) in run_settings().items()
                 if f.metadata.get("override") and key not in exclude)


def setting_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def run_config_from_settings(values: Mapping[str, Any]) -> RunConfig:
    """A ``RunConfig`` from flat settings (``{"batch_size": 16, "tokenizer_kind": "paper",
    ...}``); the others keep their defaults. KeyError for an unknown key."""
    known = run_settings()
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {section: {} for section, _ in _SECTIONS}
    for key, value in values.items():
        section, f = known[key]
        (top if section is None else parts[section])[f.name] = value
    return RunConfig(**top, data=DataConfig(**parts["data"]),
                     tokenizer=TokenizerConfig(**parts["tokenizer"]),
                     train=TrainConfig(**parts["train"]))


def setting_of(run: RunConfig, key: str) -> Any:
    """The value of the flat setting ``key`` in ``run``."""
    section, f = run_settings()[key]
    return getattr(run if section is None else getattr(run, section), f.name)


def format_default(value: Any) -> str:
    """A default as help texts write it (``3e-4``, ``0.9 0.95``, ``0``)."""
    if isinstance(value, (list, tuple)):
        return " ".join(format_default(v) for v in value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.0e}".replace("e-0", "e-")
        return repr(value)
    return str(value)


def setting_help(f: dataclasses.Field, text: str | None = None) -> str:
    return (text or f.metadata["help"]).replace("{default}", format_default(setting_default(f)))


def option_fields() -> Iterator[dataclasses.Field]:
    """Fields of ``gam train``'s options: the run's settings, then the runtime options."""
    for _, f in run_settings().values():
        if setting_flag(f):
            yield f
    for f in fields(RuntimeOptions):
        if setting_flag(f):
            yield f


def add_setting_arguments(groups: Mapping[str, Any]) -> None:
    """Add an option for every setting to the argparse group named by its ``group``; every
    default is None (not given: the dataclass default, or the recorded one on --resume)."""
    for f in option_fields():
        kwargs = dict(f.metadata["argparse"])
        dest = setting_key(f)
        group = groups[f.metadata["group"]]
        group.add_argument(setting_flag(f), dest=dest, default=None, help=setting_help(f),
                           **kwargs)
        for old in f.metadata.get("old_flags", ()):
            group.add_argument(old, dest=dest, default=None, metavar="NAME",
                               help=f"former name of {setting_flag(f)}", **kwargs)
        alias = f.metadata.get("alias")
        if alias is not None:
            flag, const, text = alias
            group.add_argument(flag, dest=dest, action="store_const", const=const,
                               help=setting_help(f, text))


def add_override_arguments(group: Any, keys: tuple[str, ...]) -> None:
    """Options that override the settings ``keys`` of a benchmark protocol: ``override the
    ...`` (``'none'`` where the setting allows it); absent (SUPPRESS) means the protocol's."""
    known = run_settings()
    for key in keys:
        _, f = known[key]
        kwargs = {k: v for k, v in f.metadata["argparse"].items() if k in ("type", "choices")}
        text = f"override {f.metadata['override']}"
        if f.metadata.get("none"):
            kwargs["type"] = optional_positive_int
            text += f" ('none': {f.metadata['none']})"
        kwargs.update(f.metadata["bench"])
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        group.add_argument(setting_flag(f), dest=key,
                           default=argparse.SUPPRESS, help=text, **kwargs)


def options_given(args: argparse.Namespace, skip: set[str]) -> dict[str, str]:
    """dest -> flag of the setting options given on the command line (not None)."""
    flags = {setting_key(f): setting_flag(f) for f in option_fields()}
    return {k: flags.get(k, "--" + k.replace("_", "-")) for k, v in vars(args).items()
            if k not in skip and v is not None}
