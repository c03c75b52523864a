"""The training protocols of ``gam bench compare`` and ``gam bench ablate``: what is identical
across the models of a benchmark.

A protocol is a named set of overrides of the one run configuration
(:class:`gam.training.RunConfig`, by the settings' flat keys of ``gam.training.config``) plus a
description; every setting it does not name keeps its ``gam train`` default. The command-line
overrides (``--epochs``, ``--lr``, ...) are derived from the same settings
(``add_override_arguments``). The presets, and what was measured to choose them, are described
in docs/design.md ("Benchmark protocols").
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gam.training import RunConfig
from gam.training.argtypes import parse_model_arg
from gam.training.config import current_setting_names
from gam.training.options import (
    add_override_arguments,
    overridable_keys,
    run_config_from_settings,
    run_settings,
    setting_default,
)

# settings a protocol states (in results.json's "protocol", in this order)
PROTOCOL_SETTINGS = ("model_preset", "vocab_size", "tokenizer_kind", "tokenizer_on_all_splits",
                     "seq_len", "batch_size", "epochs", "max_steps", "lr", "warmup_steps",
                     "dtype", "max_train_rows", "max_val_rows", "eval_every", "eval_batch_size",
                     "log_every", "save_every", "gate_stat_batches")
# ... and those the command line may override: every setting with an override text but the
# passkey share, which only ``gam bench long`` mixes in (results.json's protocol omits it)
OVERRIDABLE = overridable_keys(exclude={"passkey_mix"})


@dataclass(frozen=True)
class Protocol:
    """``name``, ``description`` and ``settings``: overrides of the run configuration by flat
    setting key. ``protocol.lr`` (any setting key) reads the value in force."""

    name: str
    description: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        known = run_settings()
        if key not in known:
            raise AttributeError(f"{type(self).__name__} has no setting {key!r}")
        settings = object.__getattribute__(self, "settings")
        return settings[key] if key in settings else setting_default(known[key][1])

    def override(self, **changes: Any) -> Protocol:
        """The same protocol with some settings changed; the description says which, so a
        report never states the preset's budget for a run that overrode it."""
        changed = {k: v for k, v in changes.items() if getattr(self, k) != v}
        description = self.description
        if changed:
            description += (" (preset description; this run overrides "
                            + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")")
        return Protocol(self.name, description, {**self.settings, **changes})

    def run_config(self, model: str, dataset: str, seed: int, overrides: dict[str, Any],
                   data_dir: str | None) -> RunConfig:
        """The run of ``model`` (with config ``overrides``) on ``dataset`` with ``seed``."""
        # the protocol's own model settings (paper: the official init) under the command's
        model_arg = {**self.settings.get("model_arg", {}), **overrides}
        return run_config_from_settings({
            **self.settings, "model": model, "model_arg": model_arg, "dataset": dataset,
            "data_dir": data_dir, "seed": seed})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: getattr(self, k) for k in PROTOCOL_SETTINGS},
                "description": self.description}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Protocol:
        """Inverse of :meth:`to_dict` (e.g. a results.json's ``protocol``, settings renamed
        since it was written included)."""
        settings = {k: v for k, v in current_setting_names(values).items()
                    if k in run_settings()}
        return cls(values["name"], values.get("description", ""), settings)


PROTOCOLS: dict[str, Protocol] = {
    "paper": Protocol(
        "paper",
        "the paper's setup as in its official code (meant for a GPU): model preset paper, "
        "paper tokenizer with 10,000 tokens trained on all splits, blocks of 256, batch 32, "
        "5 epochs, AdamW lr 3e-4 (100 warm-up steps, cosine), fp32, first 50,000 train / "
        "5,000 validation rows; validation after every epoch; the official initialisation "
        "(init=paper: tied head, positions N(0, 1))",
        dict(model_preset="paper", model_arg={"init": "paper"}, vocab_size=10000,
             tokenizer_kind="paper",
             tokenizer_on_all_splits=True, seq_len=256, batch_size=32, epochs=5,
             max_steps=None, lr=3e-4, warmup_steps=100, dtype="fp32", max_train_rows=50000,
             max_val_rows=5000, eval_every=None, log_every=10, save_every=250)),
    "cpu": Protocol(
        "cpu",
        "the paper's recipe scaled to a 2-core CPU: model preset cpu-small (d 256, 4 layers, "
        "~5.5M parameters), paper tokenizer with 10,000 tokens trained on all splits, blocks "
        "of 256, batch 16, bf16 autocast, a budget of 400 optimizer steps (1,638,400 training "
        "tokens, 0.64 of a WikiText-2 epoch) with AdamW lr 1e-3 (40 warm-up steps, cosine to 0 "
        "over the budget), same data rows as the paper (whole WikiText-2 validation split), "
        "validation every 100 steps",
        dict(model_preset="cpu-small", vocab_size=10000, tokenizer_kind="paper",
             tokenizer_on_all_splits=True, seq_len=256, batch_size=16, epochs=1, max_steps=400,
             lr=1e-3, warmup_steps=40, dtype="bf16", max_train_rows=50000, max_val_rows=5000,
             eval_every=100, log_every=10, save_every=100)),
    "quick": Protocol(
        "quick",
        "smoke test: model preset tiny, vocabulary 512, blocks of 64, batch 8, 20 steps, first "
        "2,000 train / 200 validation rows (numbers mean nothing)",
        dict(model_preset="tiny", vocab_size=512, tokenizer_kind="paper",
             tokenizer_on_all_splits=True, seq_len=64, batch_size=8, epochs=1, max_steps=20,
             lr=3e-3, warmup_steps=2, dtype="fp32", max_train_rows=2000, max_val_rows=200,
             eval_every=10, log_every=2, save_every=5)),
}

DATASET_NOTES = {
    "austen": "Jane Austen's novels (Persuasion held out for validation), used as a stand-in "
              "for TinyStories, which is not available offline: adult 19th-century prose, not "
              "children's stories, so these numbers are not comparable with the paper's "
              "TinyStories results.",
    "python-stdlib": "the .py files of the running interpreter's standard library, test suites "
                     "excluded (gam.data.code_corpus); the interpreter version and a SHA-256 of "
                     "the files are recorded in every run.",
    "tinystories": "TinyStories (the paper's second corpus) has to be found in --data-dir / "
                   "$GAM_DATA_DIR or on the Hugging Face hub; where it is not available, use "
                   "`austen` as a stand-in and say so.",
}


# ------------------------------------------------------------------------------- arguments
def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The options compare and ablate share (the dispatcher adds --device, --threads, --out,
    --quick and --seed). Overrides default to SUPPRESS: absent means "the preset's value"."""
    keep = argparse.SUPPRESS
    g = parser.add_argument_group("protocol (identical for every model)")
    g.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                   help="paper: the paper's exact setup (meant for a GPU); cpu: scaled to "
                        "finish on a 2-core CPU (settings below). --quick replaces either by a "
                        "seconds-long smoke configuration")
    g.add_argument("--seeds", type=int, nargs="+", default=keep, metavar="K",
                   help="seeds to run, each the init and data-order seed of every model; mean "
                        "and sample std over seeds are reported (default: --seed)")
    add_override_arguments(g, OVERRIDABLE)
    g.add_argument("--model-arg", action="append", type=parse_model_arg, default=keep,
                   metavar="KEY=VALUE", dest="model_args",
                   help="a model config field for every model, repeatable (e.g. --model-arg "
                        "pos_embedding_std=0.02); as `gam train --model-arg`")
    g = parser.add_argument_group("data and output")
    g.add_argument("--data-dir", default=keep, metavar="DIR",
                   help="folder with the corpora (default: $GAM_DATA_DIR, else the Hugging "
                        "Face hub)")
    g.add_argument("--cache-dir", default=keep, metavar="DIR",
                   help="tokenizer / token-id cache (default: $GAM_CACHE_DIR or ~/.cache/gam)")
    g.add_argument("--quiet", action="store_true", help="no per-step training log")
    g.add_argument("--report-only", action="store_true",
                   help="train nothing: report the finished runs in --out and list the others "
                        "as not run (safe beside a process still training in that folder)")
    parser.epilog = "presets: " + "; ".join(
        f"{name}: {p.description}" for name, p in PROTOCOLS.items()) + "."


def resolve_protocol(args: argparse.Namespace) -> Protocol:
    """The preset (``quick`` if --quick) with the command-line overrides applied."""
    base = PROTOCOLS["quick" if getattr(args, "quick", False) else args.preset]
    changes = {k: getattr(args, k) for k in OVERRIDABLE if hasattr(args, k)}
    return base.override(**changes) if changes else base


def resolve_data_dir(data_dir: str | None) -> tuple[str | None, bool]:
    """``(folder, explicit)``: --data-dir (explicit: authoritative), else None: the loader then
    tries $GAM_DATA_DIR and the hub, as every other command does (never a folder guessed from
    where the checkout sits)."""
    if data_dir is not None:
        return str(Path(data_dir).expanduser()), True
    return None, False


def seeds_of(args: argparse.Namespace) -> list[int]:
    seeds = list(getattr(args, "seeds", None) or [int(args.seed)])
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {seeds}")
    return seeds


def protocol_markdown(protocol: Protocol, seeds: Sequence[int]) -> str:
    p = protocol
    steps = f"max {p.max_steps} steps" if p.max_steps else "no step cap"
    return (f"Protocol `{p.name}`: {p.description}. Settings: model preset `{p.model_preset}`, "
            f"tokenizer `{p.tokenizer_kind}` (vocab {p.vocab_size}"
            f"{', trained on all splits' if p.tokenizer_on_all_splits else ''}), seq_len "
            f"{p.seq_len}, batch {p.batch_size}, {p.epochs} epoch(s), {steps}, lr {p.lr:g} "
            f"(warm-up {p.warmup_steps}), dtype {p.dtype}, rows train/val "
            f"{p.max_train_rows}/{p.max_val_rows}, eval every {p.eval_every or 'epoch'}; "
            f"seeds {list(seeds)}. Identical data, tokenizer, steps and data order for every "
            f"model.")
