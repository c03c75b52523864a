"""What a training run is made of: the model, the data, the tokenizer and the optimisation recipe.

``RunConfig`` is written to ``RUN_DIR/config.json`` and holds everything needed to rebuild the
model, the tokenizer and the exact data stream of a run (``--resume`` reads it back).

The defaults of :class:`TrainConfig` are the paper's recipe, as in its official code: blocks of
256 tokens, batch 32, AdamW (lr 3e-4, betas (0.9, 0.95), weight decay 0.1 on *every* parameter),
100 linear warm-up steps then cosine decay to 0, gradient clipping at 1.0, 5 epochs.

Every setting is defined once, here: a dataclass field with its default and its metadata
(:func:`setting`): the help text (``{default}`` stands for the default), the command-line flag,
the argparse details and, for the settings a benchmark protocol may change, what its override
means. ``gam train``'s options (``gam.training.options.add_setting_arguments``), ``config.json``
(``RunConfig.to_dict``) and the benchmark protocols (named sets of overrides of these
settings, :mod:`gam.bench.protocols`) are derived from them. A setting's *key* is its flat name
across the sections (``batch_size``, ``tokenizer_kind`` for ``TokenizerConfig.kind``, ...):
the ``gam train`` option's ``dest``, a protocol's override name and, with dashes, the option's
flag. One setting has one name: the flag, the key and ``config.json``'s entry (a tokenizer
field's entry is ``tokenizer.<field>`` and its key ``tokenizer_<field>``, but ``vocab_size``,
the model's too); settings renamed since runs were first written are read under their old names
(:data:`RENAMED_KEYS`, :data:`RENAMED_SETTINGS`) and ``gam train`` still takes their old
flags.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gam.data.tokenizer import TOKENIZER_KINDS
from gam.models.lm import dataclass_from_dict
from gam.models.registry import MODELS, PRESETS
from gam.runtime import DTYPES as AUTOCAST_DTYPES
from gam.training import argtypes
from gam.training.argtypes import (
    SEED_LIMIT,
    nonneg_int,
    number,
    parse_model_arg,
    positive_int,
)

DTYPES = tuple(AUTOCAST_DTYPES)  # the names of gam.runtime's dtypes, in its order
DECAY_FILTERS = ("all", "nanogpt")
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")  # also "cuda:N" (gam.runtime.resolve_device)
PAPER_VOCAB_SIZE = 10000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, flag: str) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} ({flag}) must be a positive integer, got {value!r}")


def _optional_positive_int(name: str, value: Any, flag: str) -> None:
    if value is not None:
        _positive_int(name, value, flag)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


_from_known = dataclass_from_dict


def setting(default: Any = MISSING, *, help: str, flag: str | None = None,
            key: str | None = None, group: str | None = None, override: str | None = None,
            none: str | None = None, old_flags: tuple[str, ...] = (),
            alias: tuple[str, Any, str] | None = None, bench: dict[str, Any] | None = None,
            default_factory: Any = MISSING,
            **argparse_kwargs: Any) -> Any:
    """A config field with everything the command line and the protocols need to know.

    ``help``: the option's help (``{default}`` is replaced by the field's default); ``flag``:
    the option (default ``--`` + the name with dashes; ``""``: no option); ``key``: the flat
    name (default the field name); ``group``: the ``gam train --help`` group; ``override``:
    a benchmark protocol may change it, and this says what (``override <text>``); ``none``:
    the protocol option also takes ``none``, meaning this; ``old_flags``: former spellings of
    the option, still accepted; ``bench``: argparse details of the protocol
    option that differ from the ``gam train`` one; ``alias``: ``(flag, const, help)`` of a
    second option that sets a fixed value; the rest goes to ``add_argument`` (type, choices,
    metavar, nargs, action...)."""
    metadata = {"help": help, "flag": flag, "key": key, "group": group, "override": override,
                "none": none, "old_flags": old_flags, "alias": alias, "bench": bench or {},
                "argparse": argparse_kwargs}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Optimisation settings (the defaults are the paper's recipe).

    ``batch_size`` is the *global* batch per optimizer step, in blocks: with N processes and
    ``grad_accum`` A, each process runs A micro-batches of ``batch_size / (N * A)`` blocks
    (it must divide evenly), so the loss curve does not depend on N or A.

    ``decay_filter``: ``"all"`` applies weight decay to every parameter, as the official GAM
    code does (``AdamW(model.parameters(), weight_decay=0.1)``); ``"nanogpt"`` exempts norms,
    biases (every parameter with fewer than 2 dimensions) and the embeddings (token embedding,
    which is also the tied output head, and position embedding), as minGPT/nanoGPT's
    ``configure_optimizers`` did, plus the parameters a family lists in a module's
    ``no_weight_decay_names`` (Mamba's A_log, D, ...). Under either
    filter, parameters a family hints (``optimizer_hints``: S4D's SSM parameters) take the
    hint's weight decay.

    Learning rate at optimizer step s (0-based): ``lr * (s + 1) / warmup_steps`` during warm-up,
    then cosine from ``lr`` down to ``min_lr`` at ``total_steps``, where ``total_steps`` is
    ``epochs * batches_per_epoch``, or ``max_steps`` if that is smaller (a short run still
    decays fully). Parameters a family caps (``optimizer_hints``, e.g. S4D's ``ssm_lr``) have
    their own group whose learning rate is ``min(lr, cap) / lr`` times this at every step.
    """

    batch_size: int = setting(
        32, help="global batch in blocks per optimizer step (default {default})", type=int,
        group="optimisation", override="the preset's batch (blocks per optimizer step)",
        bench={"metavar": "N"})
    grad_accum: int = setting(
        1, help="split each process's batch into N micro-batches (default {default})",
        type=int, group="optimisation")
    epochs: int = setting(
        5, help="passes over the train split (default {default}); with --resume: the run's new "
                "length, dropping a recorded --max-steps (see below)",
        type=int, group="optimisation", override="the preset's epochs")
    max_steps: int | None = setting(
        None, help="stop after N optimizer steps, the cosine schedule ends there (default: "
                   "none, the --epochs); with --resume: the run's new length, the cosine is "
                   "recomputed to end there (see below)",
        type=int, group="optimisation", override="the preset's step budget",
        none="full epochs", bench={"metavar": "N"})
    lr: float = setting(
        3e-4, help="peak learning rate (default {default})", type=number, group="optimisation",
        override="the peak learning rate", bench={"type": float})
    min_lr: float = setting(
        0.0, help="learning rate at the end of the cosine (default {default})", type=number,
        group="optimisation")
    betas: tuple[float, float] = setting(
        (0.9, 0.95), help="AdamW betas (default {default})", type=number, nargs=2,
        metavar=("B1", "B2"), group="optimisation")
    eps: float = setting(1e-8, help="AdamW epsilon", flag="")
    weight_decay: float = setting(
        0.1, help="AdamW weight decay (default {default})", type=number, group="optimisation")
    decay_filter: str = setting(
        "all", help="all: weight decay on every parameter (the official code, default); "
                    "nanogpt: not on norms, biases and embeddings",
        choices=DECAY_FILTERS, group="optimisation",
        alias=("--no-decay-norms-biases-embeddings", "nanogpt",
               "same as --decay-filter nanogpt (default: off, --decay-filter {default})"))
    warmup_steps: int = setting(
        100, help="linear warm-up steps before the cosine (default {default}, the paper's; a "
                  "short run, e.g. --max-steps 500, wants ~20)",
        type=int, group="optimisation", override="the warm-up steps", bench={"metavar": "N"})
    grad_clip: float = setting(
        1.0, help="max gradient norm, 0 disables (default {default})", type=number,
        group="optimisation")
    dtype: str = setting(
        "fp32", help="{default} (default); bf16 = torch.autocast on CPU or CUDA; fp16 = "
                     "autocast + GradScaler, CUDA only",
        choices=DTYPES, group="optimisation",
        override="the preset's dtype (bf16/fp16: autocast)")
    compile: bool = setting(
        False, help="torch.compile the model (default: off; the first step then takes ~20 s "
                    "on a CPU)", action="store_true", group="optimisation")
    seed: int = setting(
        42, help="seed of the init, the data order and dropout (default {default})",
        type=argtypes.seed,
        group="optimisation")
    strategy: str = setting(
        "ddp", help="with several processes (torchrun): ddp (default) keeps a whole copy of the "
                    "model, gradients and optimizer state on each; fsdp shards them over the "
                    "processes (FSDP2: each block and the model fully_shard-ed) and saves "
                    "sharded checkpoints (torch.distributed.checkpoint), which a run may resume "
                    "with another number of processes",
        choices=STRATEGIES, group="hardware")
    eval_every: int | None = setting(
        None, help="also evaluate every N steps (default: none; always at each epoch end and "
                   "at the end)",
        type=int, group="logging", override="the evaluation interval",
        none="at epoch ends and the last step only", bench={"metavar": "N"})
    eval_batch_size: int | None = setting(
        None, help="blocks per evaluation batch and process (default: the training one)",
        type=int, group="logging")
    gate_stat_batches: int = setting(
        4, help="validation batches for the GAM gate statistics at each evaluation (default "
                "{default}, 0 disables)", type=nonneg_int, group="logging")
    log_every: int = setting(
        10, help="write a metrics record every N steps (default {default})", type=int,
        group="logging")
    save_every: int | None = setting(
        250, help="checkpoint every N steps (default {default}; also at epoch ends and the end)",
        type=int, group="logging")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives a list
        self.validate()

    def validate(self) -> None:
        _positive_int("batch_size", self.batch_size, "--batch-size")
        _positive_int("grad_accum", self.grad_accum, "--grad-accum")
        _positive_int("epochs", self.epochs, "--epochs")
        _optional_positive_int("max_steps", self.max_steps, "--max-steps")
        _optional_positive_int("eval_every", self.eval_every, "--eval-every")
        _optional_positive_int("eval_batch_size", self.eval_batch_size, "--eval-batch-size")
        _optional_positive_int("save_every", self.save_every, "--save-every")
        _positive_int("log_every", self.log_every, "--log-every")
        if not _is_int(self.gate_stat_batches) or self.gate_stat_batches < 0:
            raise ValueError(f"gate_stat_batches must be an integer >= 0, got "
                             f"{self.gate_stat_batches!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps (--warmup-steps) must be an integer >= 0, got "
                             f"{self.warmup_steps!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed (--seed) must be an integer from 0 to {SEED_LIMIT - 1}, "
                             f"got {self.seed!r}")
        if not _finite_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr (--lr) must be a positive number, got {self.lr!r}")
        if not _finite_number(self.min_lr) or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr (--min-lr) must be in [0, lr={self.lr}], got "
                             f"{self.min_lr!r}")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay (--weight-decay) must be >= 0, got "
                             f"{self.weight_decay!r}")
        if not _finite_number(self.eps) or self.eps <= 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if len(self.betas) != 2 or not all(_finite_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas (--betas) must be two numbers in [0, 1), got {self.betas!r}")
        if not _finite_number(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"grad_clip (--grad-clip) must be >= 0 (0 disables clipping), got "
                             f"{self.grad_clip!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype (--dtype) must be one of {DTYPES}, got {self.dtype!r}")
        if self.decay_filter not in DECAY_FILTERS:
            raise ValueError(f"decay_filter (--decay-filter) must be one of {DECAY_FILTERS}, "
                             f"got {self.decay_filter!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy (--strategy) must be one of {STRATEGIES}, got "
                             f"{self.strategy!r}")
        if self.strategy == "fsdp" and self.dtype == "fp16":
            # the grad scaler would see only this process's gradient shard when it looks for
            # inf/nan: the processes could disagree on skipping a step
            raise ValueError("--dtype fp16 (grad scaler) is not supported with --strategy fsdp; "
                             "use --dtype bf16")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return _from_known(cls, values)


@dataclass
class DataConfig:
    """Which text, cut how, into blocks of which length.

    ``dataset``: a corpus name of :func:`gam.data.load_corpus` (``wikitext2``,
    ``wikitext2-tokens``, ``tinystories``, ``austen``) or ``text:PATH``. ``seq_len`` None means
    the model's ``max_seq_len``. ``use_hub=False`` (``--no-use-hub``) never contacts the
    Hugging Face hub.
    """

    dataset: str = setting(
        "wikitext2", help="{default} (default), wikitext2-tokens, tinystories, austen, "
                          "python-stdlib (this interpreter's library) or text:PATH (a text "
                          "file or a folder with train.txt, valid.txt)",
        type=argtypes.dataset_name, group="data")
    data_dir: str | None = setting(
        None, help="folder holding the corpus folders (default: $GAM_DATA_DIR, else the "
                   "Hugging Face hub)", group="data")
    max_train_rows: int | None = setting(
        None, help="keep the first N rows of the train split (default: all)", type=positive_int,
        group="data", override="the train row limit", none="all", bench={"metavar": "N"})
    max_val_rows: int | None = setting(
        None, help="keep the first N rows of the valid/test splits (default: all)",
        type=positive_int, group="data", override="the validation row limit", none="all",
        bench={"metavar": "N"})
    seq_len: int | None = setting(
        None, help="block length (default and maximum: the model's max_seq_len)",
        type=positive_int, group="data", override="the block length",
        bench={"type": int, "metavar": "N"})
    use_hub: bool = setting(
        True, help="try the Hugging Face hub for a corpus not found locally (default: yes; "
                   "--no-use-hub never contacts it)", action=argparse.BooleanOptionalAction,
        alias=("--offline", False, "former name of --no-use-hub"), group="data")
    passkey_mix: float = setting(
        0.0, help="share of the training blocks replaced by passkey-retrieval samples "
                  "(gam.data.passkey; default {default}: none)", type=number, group="data",
        override="the share of training blocks replaced by passkey samples",
        bench={"type": float, "metavar": "FRACTION"})

    def __post_init__(self) -> None:
        if not _finite_number(self.passkey_mix) or not 0 <= self.passkey_mix < 1:
            raise ValueError(f"passkey_mix (--passkey-mix) must be in [0, 1), got "
                             f"{self.passkey_mix!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset (--dataset) must be a corpus name, got {self.dataset!r}")
        _optional_positive_int("max_train_rows", self.max_train_rows, "--max-train-rows")
        _optional_positive_int("max_val_rows", self.max_val_rows, "--max-val-rows")
        _optional_positive_int("seq_len", self.seq_len, "--seq-len")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        return _from_known(cls, values)


@dataclass
class TokenizerConfig:
    """BPE tokenizer of :func:`gam.data.train_tokenizer`; ``vocab_size`` is also the model's."""

    kind: str = setting(
        "bytelevel", help="{default} BPE (default, lossless) or the official code's whitespace "
                          "BPE",
        flag="--tokenizer-kind", key="tokenizer_kind", old_flags=("--tokenizer",),
        choices=TOKENIZER_KINDS, group="data", override="the tokenizer kind")
    vocab_size: int = setting(
        PAPER_VOCAB_SIZE, help="tokenizer vocabulary size, also the model's vocab_size (default "
                               "{default})",
        type=argtypes.vocab_size, group="data", override="the vocabulary size",
        bench={"metavar": "N"})
    on_all_splits: bool = setting(
        False, help="train the tokenizer on train+valid+test as the official code (leaks "
                    "evaluation text; default: train split only)",
        flag="--tokenizer-on-all-splits", key="tokenizer_on_all_splits", action="store_true",
        group="data")

    def __post_init__(self) -> None:
        _positive_int("vocab_size", self.vocab_size, "--vocab-size")
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer kind (--tokenizer-kind) must be one of "
                             f"{TOKENIZER_KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TokenizerConfig:
        return _from_known(cls, values)


@dataclass
class RunConfig:
    """A whole run: ``model`` name and size preset (``model_preset``) of
    :func:`gam.build_model`, its config overrides (``model_arg``: ``--model-arg``, and
    ``--dropout``), data, tokenizer and training recipe."""

    model: str = setting(
        "gam", help="model family / variant (default {default})", choices=sorted(MODELS),
        group="model")
    model_preset: str = setting(
        "paper", help="size preset (default {default})", choices=sorted(PRESETS),
        old_flags=("--preset",), group="model",
        override="the build_model size preset (paper, cpu-small, tiny)",
        bench={"choices": None, "metavar": "NAME"})
    model_arg: dict[str, Any] = setting(
        help="override a model config field, repeatable (e.g. --model-arg "
             "num_memory_slots=128; default: none, the preset's values)",
        action="append", type=parse_model_arg, metavar="KEY=VALUE", group="model",
        default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if "vocab_size" in self.model_arg:
            raise ValueError("set the vocabulary size with --vocab-size (it sizes both the "
                             "tokenizer and the model), not with --model-arg vocab_size=...")

    def with_data_dir(self, data_dir: str | os.PathLike[str] | None) -> RunConfig:
        """This run reading its corpus from ``data_dir`` (recorded absolute, so that eval and
        resume work from any directory); unchanged when None. ``self`` is not modified."""
        if data_dir is None:
            return self
        resolved = str(Path(data_dir).expanduser().resolve())
        return replace(self, data=replace(self.data, data_dir=resolved))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword overrides for ``build_model(model, model_preset, **kwargs)``."""
        return {**self.model_arg, "vocab_size": self.tokenizer.vocab_size}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_preset": self.model_preset,
                "model_arg": dict(self.model_arg), "data": self.data.to_dict(),
                "tokenizer": self.tokenizer.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Read the ``RunConfig`` part of a ``config.json`` (extra keys are ignored; a config
        written before a setting was renamed is read under the new name)."""
        values = current_names(values)
        try:
            return cls(
                model=values["model"], model_preset=values["model_preset"],
                model_arg=dict(values.get("model_arg", {})),
                data=DataConfig.from_dict(_known_part(DataConfig, values["data"])),
                tokenizer=TokenizerConfig.from_dict(
                    _known_part(TokenizerConfig, values["tokenizer"])),
                train=TrainConfig.from_dict(_known_part(TrainConfig, values["train"])),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"run config is incomplete or malformed ({e!r})") from e


# top-level keys of config.json (and of a checkpoint's recorded settings) renamed since runs were
# first written: old name -> new name
RENAMED_KEYS = {"preset": "model_preset", "model_overrides": "model_arg"}
# flat setting keys (a benchmark protocol's, as results.json records them) renamed since: old
# name -> new name (RENAMED_KEYS' renames kept their flat key)
RENAMED_SETTINGS = {"tokenizer": "tokenizer_kind"}


def _renamed(values: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    out = dict(values)
    for old, new in renames.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def current_names(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a ``RunConfig.to_dict()`` as once written) with renamed keys under their
    current names; the input is not changed."""
    return _renamed(values, RENAMED_KEYS)


def current_setting_names(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (flat settings by key, as a protocol once recorded them) with renamed keys
    under their current names; the input is not changed."""
    return _renamed(values, RENAMED_SETTINGS)


def _known_part(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in known}


@dataclass
class RuntimeOptions:
    """How (not what) to run: these may change between a run and its ``--resume``."""

    device: str = setting(
        "auto", help="{default} (default) = cuda if available, else cpu",
        choices=DEVICES, group="hardware")
    threads: int | None = setting(
        None, help="torch CPU threads (torch.set_num_threads); default one per core, fewer when "
                   "other processes already keep the cores busy",
        type=argtypes.thread_count, group="hardware")
    tf32: bool | None = setting(  # None: on for CUDA unless $GAM_TF32=0 (gam.runtime.set_tf32)
        None, help="TF32 tensor-core matmuls and convolutions for float32 on CUDA (default: on, "
                   "unless GAM_TF32=0; --no-tf32: full float32; no effect on a CPU)",
        action=argparse.BooleanOptionalAction, group="hardware")
    quiet: bool = setting(
        False, help="no progress bar or log lines, warnings and errors only (default: off)",
        action="store_true", group="logging")
    progress: bool | None = setting(  # None: a tqdm bar when stderr is a terminal
        None, help="a progress bar (None: when stderr is a terminal)", flag="")
    wandb: bool = setting(
        False, help="also log to Weights & Biases (needs wandb; default: off)",
        action="store_true", group="logging")
    tensorboard: bool = setting(
        False, help="also log to TensorBoard in RUN_DIR/tensorboard (needs tensorboard; "
                    "default: off)", action="store_true", group="logging")
    cache_dir: str | None = setting(
        None, help="tokenizer / token-id cache (default $GAM_CACHE_DIR or ~/.cache/gam)",
        group="data")

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not str(self.device).startswith(
                "cuda:"):
            raise ValueError(f"device (--device) must be auto, cpu or cuda, got {self.device!r}")
        _optional_positive_int("threads", self.threads, "--threads")
