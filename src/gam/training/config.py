"""What a training run is made of: the model, the data, the tokenizer and the optimisation recipe.

``RunConfig`` is written to ``RUN_DIR/config.json`` and holds everything needed to rebuild the
model, the tokenizer and the exact data stream of a run (``--resume`` reads it back).

The defaults of :class:`TrainConfig` are the paper's recipe, as in its official code: blocks of
256 tokens, batch 32, AdamW (lr 3e-4, betas (0.9, 0.95), weight decay 0.1 on *every* parameter),
100 linear warm-up steps then cosine decay to 0, gradient clipping at 1.0, 5 epochs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gam.models.lm import dataclass_from_dict

DTYPES = ("fp32", "bf16", "fp16")
DECAY_FILTERS = ("all", "nanogpt")
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
    ``configure_optimizers`` did, plus any parameter flagged ``_no_weight_decay``.

    Learning rate at optimizer step s (0-based): ``lr * (s + 1) / warmup_steps`` during warm-up,
    then cosine from ``lr`` down to ``min_lr`` at ``total_steps``, where ``total_steps`` is
    ``epochs * batches_per_epoch``, or ``max_steps`` if that is smaller (a short run still
    decays fully).
    """

    batch_size: int = 32
    grad_accum: int = 1
    epochs: int = 5
    max_steps: int | None = None
    lr: float = 3e-4
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_filter: str = "all"
    warmup_steps: int = 100
    grad_clip: float = 1.0
    dtype: str = "fp32"
    compile: bool = False
    seed: int = 42
    eval_every: int | None = None
    eval_batch_size: int | None = None
    gate_stat_batches: int = 4
    log_every: int = 10
    save_every: int | None = 250

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
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed (--seed) must be an integer >= 0, got {self.seed!r}")
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
    the model's ``max_seq_len``. ``use_hub=False`` never contacts the Hugging Face hub.
    """

    dataset: str = "wikitext2"
    data_dir: str | None = None
    max_train_rows: int | None = None
    max_val_rows: int | None = None
    seq_len: int | None = None
    use_hub: bool = True

    def __post_init__(self) -> None:
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

    kind: str = "bytelevel"
    vocab_size: int = PAPER_VOCAB_SIZE
    on_all_splits: bool = False

    def __post_init__(self) -> None:
        _positive_int("vocab_size", self.vocab_size, "--vocab-size")
        if self.kind not in ("bytelevel", "paper"):
            raise ValueError(f"tokenizer kind (--tokenizer) must be 'bytelevel' or 'paper', got "
                             f"{self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TokenizerConfig:
        return _from_known(cls, values)


@dataclass
class RunConfig:
    """A whole run: ``model`` name and size ``preset`` of :func:`gam.build_model`, config
    overrides (``--model-arg``, ``--dropout``), data, tokenizer and training recipe."""

    model: str = "gam"
    preset: str = "paper"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if "vocab_size" in self.model_overrides:
            raise ValueError("set the vocabulary size with --vocab-size (it sizes both the "
                             "tokenizer and the model), not with --model-arg vocab_size=...")

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword overrides for ``build_model(model, preset, **kwargs)``."""
        return {**self.model_overrides, "vocab_size": self.tokenizer.vocab_size}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "preset": self.preset,
                "model_overrides": dict(self.model_overrides), "data": self.data.to_dict(),
                "tokenizer": self.tokenizer.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Read the ``RunConfig`` part of a ``config.json`` (extra keys are ignored)."""
        try:
            return cls(
                model=values["model"], preset=values["preset"],
                model_overrides=dict(values.get("model_overrides", {})),
                data=DataConfig.from_dict(_known_part(DataConfig, values["data"])),
                tokenizer=TokenizerConfig.from_dict(
                    _known_part(TokenizerConfig, values["tokenizer"])),
                train=TrainConfig.from_dict(_known_part(TrainConfig, values["train"])),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"run config is incomplete or malformed ({e!r})") from e


def _known_part(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in known}


@dataclass
class RuntimeOptions:
    """How (not what) to run: these may change between a run and its ``--resume``."""

    device: str = "auto"
    threads: int | None = None
    quiet: bool = False
    progress: bool | None = None  # None: a tqdm bar when stderr is a terminal
    wandb: bool = False
    tensorboard: bool = False
    cache_dir: str | None = None
    data_dir: str | None = None  # on resume: where the data lives now (default: as recorded)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith(
                "cuda:"):
            raise ValueError(f"device (--device) must be auto, cpu or cuda, got {self.device!r}")
        _optional_positive_int("threads", self.threads, "--threads")
