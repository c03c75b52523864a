"""The task layer of recall, listops and long (``gam.bench.tasks``)."""

import argparse
import json
from dataclasses import dataclass

import pytest

from gam.bench.tasks import (
    Configuration,
    add_protocol_options,
    family_overrides,
    parse_model_spec,
    protocol_overrides,
    resolve_preset,
)


@dataclass(frozen=True)
class _Protocol:
    steps: int
    lr: float
    limit: float | None = None


def test_protocol_options_follow_the_fields_and_keep_the_preset_where_not_given():
    parser = argparse.ArgumentParser()
    add_protocol_options(parser, _Protocol, {"steps": "s", "lr": "l", "limit": "x"},
                         flags={"limit": "--max-limit"})
    args = parser.parse_args(["--steps", "7", "--max-limit", "2.5"])
    presets = {"a": _Protocol(steps=100, lr=1e-3)}
    p = resolve_preset(presets, "a", protocol_overrides(args, ("steps", "lr", "limit")),
                       at_least_one=("steps",))
    assert p == _Protocol(steps=7, lr=1e-3, limit=2.5) and isinstance(p.steps, int)
    with pytest.raises(ValueError, match="--steps must be >= 1, got 0"):
        resolve_preset(presets, "a", {"steps": 0}, at_least_one=("steps",))


def test_configuration_records_are_reused_only_for_their_key(tmp_path):
    flat = Configuration(tmp_path / "a.json", {"lr": 1})
    assert flat.finished() is None
    flat.save({"status": "ok", "accuracy": 0.5})
    assert json.loads(flat.path.read_text()) == {"key": {"lr": 1}, "status": "ok",
                                                 "accuracy": 0.5}
    assert flat.finished() == {"status": "ok", "accuracy": 0.5}
    assert Configuration(flat.path, {"lr": 2}).finished() is None  # other settings
    nested = Configuration(tmp_path / "b.json", {"k": 1}, nested=True)
    nested.save({"loss": 1.0})
    assert json.loads(nested.path.read_text()) == {"key": {"k": 1}, "result": {"loss": 1.0}}
    assert nested.finished() == {"loss": 1.0}
    flat.path.write_text("{not json")  # damaged: redone, not a traceback
    assert flat.finished() is None


def test_model_specs_and_family_overrides():
    assert parse_model_spec("gam:d_model=8", ("x",)) == ("gam", {"d_model": 8})
    assert parse_model_spec("x", ("x",)) == ("x", {})
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        parse_model_spec("nope")
    assert family_overrides("gam", {"num_memory_slots": 4, "d_state": 16}) == {
        "num_memory_slots": 4}
