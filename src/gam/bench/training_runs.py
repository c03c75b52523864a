"""The training protocol shared by ``gam bench compare`` (paper Table 1) and ``gam bench ablate``
(paper Table 3): one protocol, two front ends.

Every run of a benchmark is a ``gam.training.train`` run with the *same* data, tokenizer,
number of steps and seed; only the model (``build_model`` name and config overrides) changes:

- the corpus is loaded with the protocol's row limits and the tokenizer is trained **once per
  dataset** (``prepare_dataset``) into the tokenizer cache, from which every run of that dataset
  then loads it: all models see the same token ids. Each run records the SHA-256 of its
  ``tokenizer.json`` and the fingerprints of its data, and the results say whether they agree;
- seed ``k`` is both the model-initialisation seed and the data-order seed
  (``TrainConfig.seed``): for a given seed every model sees the batches in the same order;
- run folders are ``OUT/runs/<dataset>/<label>-seed<k>/``. A folder that already holds a
  finished run with the same configuration is *reused* (its result is read back, nothing is
  trained); an unfinished one is *resumed* exactly from its last checkpoint
  (``gam.training.resume``); a folder holding a run with another configuration is an error
  (nothing is overwritten). So an interrupted benchmark is re-run with the same command.

Protocol presets (``--preset``):

- ``paper``: the paper's setup, as in its official code (meant for a GPU): model preset
  ``paper`` (d 512, 6 layers; GAM 22.6M parameters), the official code's tokenizer (BPE with a
  whitespace pre-tokenizer, ``paper`` kind) with 10,000 tokens trained on all splits, blocks of
  256 tokens, batch 32, 5 epochs, AdamW lr 3e-4 with 100 warm-up steps then cosine decay, weight
  decay 0.1, gradient clipping 1.0, fp32, the first 50,000 train / 5,000 validation rows.
  Validation after every epoch.
- ``cpu``: the same recipe scaled to a 2-core CPU: model preset ``cpu-small`` (d 256,
  4 layers, ~5.5M parameters), same tokenizer and vocabulary (10,000), same rows, blocks of 256,
  batch 16, bf16 autocast, a budget of 400 optimizer steps for every model (1.64M training
  tokens, 0.64 of a WikiText-2 epoch; the cosine schedule decays fully over the budget, after
  40 warm-up steps), lr 1e-3, validation on the whole WikiText-2 validation split every 100
  steps. The lr is the one change of recipe, tried because at the paper's 3e-4 every model
  stayed at the unigram baseline for 400 steps (val ppl 1327 for GAM); at 1e-3 they still do
  (docs/results.md), so this budget is a smoke-scale comparison, not a ranking.
  Calibrated on the 2-core machine (1-thread CPU time per step, bf16, batch 16: GAM
  1.13 s, Transformer 1.24 s, Mamba 1.17 s; ablations 0.91-0.94 s) to finish one dataset x
  three models, or the four ablations, in about 30 minutes even without any 2-thread speed-up.
  On a loaded machine, ``--threads 1`` is much faster than 2 threads competing for the cores.
- ``quick`` (``--quick``): a smoke test: model preset ``tiny``, vocabulary 512, blocks of 64,
  batch 8, 20 steps, a few thousand rows. Seconds per run; the numbers mean nothing.

Results per run (one row each): parameters (total and without embeddings), optimizer steps,
average training time per epoch (training steps only, as the trainer measures it: measured
over complete epochs, or extrapolated from the time per step when the budget ends before the
first epoch does; ``epoch_time_basis`` says which), training tokens/s, final validation loss
and perplexity (the library's token-weighted evaluation at the last step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gam.bench import common

# -------------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    """Everything that is identical across the models of a benchmark."""

    name: str
    model_preset: str
    vocab_size: int
    tokenizer: str
    tokenizer_on_all_splits: bool
    seq_len: int
    batch_size: int
    epochs: int
    max_steps: int | None
    lr: float
    warmup_steps: int
    dtype: str
    max_train_rows: int | None
    max_val_rows: int | None
    eval_every: int | None
    eval_batch_size: int | None = None
    log_every: int = 10
    save_every: int | None = 100
    gate_stat_batches: int = 4
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "paper": Protocol(
        name="paper", model_preset="paper", vocab_size=10000, tokenizer="paper",
        tokenizer_on_all_splits=True, seq_len=256, batch_size=32, epochs=5, max_steps=None,
        lr=3e-4, warmup_steps=100, dtype="fp32", max_train_rows=50000, max_val_rows=5000,
        eval_every=None, log_every=10, save_every=250,
        description="the paper's setup as in its official code (meant for a GPU): model preset "
                    "paper, paper tokenizer with 10,000 tokens trained on all splits, blocks "
                    "of 256, batch 32, 5 epochs, AdamW lr 3e-4 (100 warm-up steps, cosine), "
                    "fp32, first 50,000 train / 5,000 validation rows; validation after every "
                    "epoch"),
    "cpu": Protocol(
        name="cpu", model_preset="cpu-small", vocab_size=10000, tokenizer="paper",
        tokenizer_on_all_splits=True, seq_len=256, batch_size=16, epochs=1, max_steps=400,
        lr=1e-3, warmup_steps=40, dtype="bf16", max_train_rows=50000, max_val_rows=5000,
        eval_every=100, log_every=10, save_every=100,
        description="the paper's recipe scaled to a 2-core CPU: model preset cpu-small "
                    "(d 256, 4 layers, ~5.5M parameters), paper tokenizer with 10,000 tokens "
                    "trained on all splits, blocks of 256, batch 16, bf16 autocast, a budget of "
                    "400 optimizer steps (1,638,400 training tokens, 0.64 of a WikiText-2 "
                    "epoch) with AdamW lr 1e-3 (40 warm-up steps, cosine to 0 over the "
                    "budget), same data rows as the paper (whole WikiText-2 validation split), "
                    "validation every 100 steps"),
    "quick": Protocol(
        name="quick", model_preset="tiny", vocab_size=512, tokenizer="paper",
        tokenizer_on_all_splits=True, seq_len=64, batch_size=8, epochs=1, max_steps=20,
        lr=3e-3, warmup_steps=2, dtype="fp32", max_train_rows=2000, max_val_rows=200,
        eval_every=10, log_every=2, save_every=5,
        description="smoke test: model preset tiny, vocabulary 512, blocks of 64, batch 8, "
                    "20 steps, first 2,000 train / 200 validation rows (numbers mean nothing)"),
}

DATASET_NOTES = {
    "austen": "Jane Austen's novels (Persuasion held out for validation), used as a stand-in "
              "for TinyStories, which is not available offline: adult 19th-century prose, not "
              "children's stories, so these numbers are not comparable with the paper's "
              "TinyStories results.",
    "tinystories": "TinyStories (the paper's second corpus) has to be found in --data-dir / "
                   "$GAM_DATA_DIR or on the Hugging Face hub; where it is not available, use "
                   "`austen` as a stand-in and say so.",
}


# ------------------------------------------------------------------------------- arguments
def _optional_positive_int(text: str) -> int | None:
    if text.lower() in ("none", "0"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


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
    g.add_argument("--epochs", type=int, default=keep, help="override the preset's epochs")
    g.add_argument("--max-steps", type=_optional_positive_int, default=keep, metavar="N",
                   help="override the preset's step budget ('none': full epochs)")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=keep,
                   help="override the preset's dtype (bf16/fp16: autocast)")
    g.add_argument("--batch-size", type=int, default=keep, metavar="N",
                   help="override the preset's batch (blocks per optimizer step)")
    g.add_argument("--seq-len", type=int, default=keep, metavar="N",
                   help="override the block length")
    g.add_argument("--lr", type=float, default=keep, help="override the peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=keep, metavar="N",
                   help="override the warm-up steps")
    g.add_argument("--vocab-size", type=int, default=keep, metavar="N",
                   help="override the vocabulary size")
    g.add_argument("--tokenizer", choices=("bytelevel", "paper"), default=keep,
                   help="override the tokenizer kind")
    g.add_argument("--model-preset", default=keep, metavar="NAME",
                   help="override the build_model size preset (paper, cpu-small, tiny)")
    g.add_argument("--model-arg", action="append", type=_model_arg, default=keep,
                   metavar="KEY=VALUE", dest="model_args",
                   help="a model config field for every model, repeatable (e.g. --model-arg "
                        "pos_embedding_std=0.02); as `gam train --model-arg`")
    g.add_argument("--max-train-rows", type=_optional_positive_int, default=keep, metavar="N",
                   help="override the train row limit ('none': all)")
    g.add_argument("--max-val-rows", type=_optional_positive_int, default=keep, metavar="N",
                   help="override the validation row limit ('none': all)")
    g.add_argument("--eval-every", type=_optional_positive_int, default=keep, metavar="N",
                   help="override the evaluation interval ('none': at epoch ends and the last "
                        "step only)")
    g = parser.add_argument_group("data and output")
    g.add_argument("--data-dir", default=keep, metavar="DIR",
                   help="folder with the corpora (default: $GAM_DATA_DIR, else the Hugging "
                        "Face hub)")
    g.add_argument("--cache-dir", default=keep, metavar="DIR",
                   help="tokenizer / token-id cache (default: $GAM_CACHE_DIR or ~/.cache/gam)")
    g.add_argument("--quiet", action="store_true", help="no per-step training log")
    parser.epilog = "presets: " + "; ".join(
        f"{name}: {p.description}" for name, p in PROTOCOLS.items()) + "."


def _model_arg(text: str) -> tuple[str, Any]:
    from gam.cli import parse_model_arg

    return parse_model_arg(text)


def apply_model_args(specs: Sequence[RunSpec], args: argparse.Namespace) -> None:
    """Merge ``--model-arg`` overrides into every spec (a spec's own overrides, such as the
    ablation's slot sweep, win)."""
    common_overrides = dict(getattr(args, "model_args", None) or [])
    for spec in specs:
        spec.overrides = {**common_overrides, **spec.overrides}


_OVERRIDES = ("epochs", "max_steps", "dtype", "batch_size", "seq_len", "lr", "warmup_steps",
              "vocab_size", "tokenizer", "model_preset", "max_train_rows", "max_val_rows",
              "eval_every")


def resolve_protocol(args: argparse.Namespace) -> Protocol:
    """The preset (``quick`` if --quick) with the command-line overrides applied."""
    base = PROTOCOLS["quick" if getattr(args, "quick", False) else args.preset]
    changes = {k: getattr(args, k) for k in _OVERRIDES if hasattr(args, k)}
    return replace(base, **changes) if changes else base


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


# ----------------------------------------------------------------------------------- specs
@dataclass
class RunSpec:
    """One training run: ``model`` (a build_model name) with config ``overrides``, shown as
    ``label``, on ``dataset`` with ``seed``."""

    dataset: str
    model: str
    seed: int
    label: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    group: str = "models"  # compare: models; ablate: variants / slots
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the run's row

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.model


def dataset_slug(dataset: str) -> str:
    if dataset.startswith("text:"):
        dataset = "text-" + (Path(dataset[5:]).stem or "corpus")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)


def run_dir_of(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / dataset_slug(spec.dataset) / f"{spec.label}-seed{spec.seed}"


def run_config_of(protocol: Protocol, spec: RunSpec, data_dir: str | None):
    from gam.training import DataConfig, RunConfig, TokenizerConfig, TrainConfig

    return RunConfig(
        model=spec.model, preset=protocol.model_preset, model_overrides=dict(spec.overrides),
        data=DataConfig(dataset=spec.dataset, data_dir=data_dir,
                        max_train_rows=protocol.max_train_rows,
                        max_val_rows=protocol.max_val_rows, seq_len=protocol.seq_len),
        tokenizer=TokenizerConfig(kind=protocol.tokenizer, vocab_size=protocol.vocab_size,
                                  on_all_splits=protocol.tokenizer_on_all_splits),
        train=TrainConfig(batch_size=protocol.batch_size, epochs=protocol.epochs,
                          max_steps=protocol.max_steps, lr=protocol.lr,
                          warmup_steps=protocol.warmup_steps, dtype=protocol.dtype,
                          seed=spec.seed, eval_every=protocol.eval_every,
                          eval_batch_size=protocol.eval_batch_size,
                          gate_stat_batches=protocol.gate_stat_batches,
                          log_every=protocol.log_every, save_every=protocol.save_every),
    )


def check_models(specs: Sequence[RunSpec], protocol: Protocol) -> None:
    """ValueError for an unknown model name, preset or override before anything is trained."""
    from gam.models.registry import model_config

    for spec in specs:
        try:
            model_config(spec.model, protocol.model_preset,
                         **{**spec.overrides, "vocab_size": protocol.vocab_size})
        except ImportError as exc:
            raise ValueError(f"model {spec.model!r} cannot be built here: {exc}") from exc


# ------------------------------------------------------------------------------------ data
def prepare_dataset(protocol: Protocol, dataset: str, data_dir: str | None,
                    cache_dir: str | None) -> dict[str, Any]:
    """Load the corpus as every run will and train its tokenizer once, into the cache every
    run then loads it from. Returns what identifies the data: tokenizer hash, token counts,
    corpus source and fingerprints."""
    from gam.data import encode_corpus, load_corpus, train_tokenizer
    from gam.data.tokenizer import tokenizer_hash

    t0 = time.perf_counter()
    corpus = load_corpus(dataset, data_dir, protocol.max_train_rows, protocol.max_val_rows)
    tokenizer = train_tokenizer(corpus, kind=protocol.tokenizer, vocab_size=protocol.vocab_size,
                                on_all_splits=protocol.tokenizer_on_all_splits,
                                cache_dir=cache_dir)
    ids = encode_corpus(corpus, tokenizer, cache_dir=cache_dir, splits=["train", "valid"])
    from gam.bench.ngram import ngram_baselines

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    return {
        "ngram_baselines": ngram_baselines(ids["train"], ids["valid"], vocab),
        "dataset": dataset,
        "source": corpus.source,
        "note": DATASET_NOTES.get(dataset),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "tokens": {s: int(len(v)) for s, v in ids.items()},
        "fingerprints": {s: corpus.fingerprint(s) for s in ("train", "valid")},
        "prepare_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------- run dirs
def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a RunConfig dict that must match for a run to be reused (not where the
    data lives)."""
    config = json.loads(json.dumps(config))
    config.get("data", {}).pop("data_dir", None)
    return config


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {b!r} (found) vs {a!r} (requested)"]


def run_state(run_dir: Path) -> tuple[str, int | None, int | None]:
    """``("absent" | "partial" | "finished", step, total_steps)`` of a run folder."""
    from gam.training.checkpoint import find_checkpoint, read_state
    from gam.training.run import is_run_dir, read_run_config

    if not is_run_dir(run_dir):
        return "absent", None, None
    total = read_run_config(run_dir).get("schedule", {}).get("total_steps")
    ckpt = find_checkpoint(run_dir)
    step = read_state(ckpt).step if ckpt is not None else 0
    if total is not None and step >= total and (run_dir / "model.json").is_file():
        return "finished", step, total
    return "partial", step, total


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def parameter_counts(model: str, preset: str, overrides: dict[str, Any]) -> dict[str, int]:
    """Total and non-embedding parameters of a model, counted on the meta device (nothing is
    allocated)."""
    from gam.models.registry import count_parameters, model_config, model_from_config

    config = model_config(model, preset, **overrides)
    with torch.device("meta"):
        built = model_from_config(model, config)
    return count_parameters(built)


def summarize_run_dir(run_dir: Path) -> dict[str, Any]:
    """The benchmark row of a finished run folder, read from its files only (the same for a run
    trained now, resumed or reused)."""
    from gam.training import RunConfig, read_metrics
    from gam.training.run import read_run_config

    config = read_run_config(run_dir)
    run = RunConfig.from_dict(config)
    schedule = config.get("schedule", {})
    evals = read_metrics(run_dir, kind="eval")
    trains = read_metrics(run_dir, kind="train")
    final = evals[-1] if evals else {}
    steps = int(final.get("step", 0))
    train_time = final.get("train_time_s")
    tokens_per_step = schedule.get("tokens_per_step") or run.train.batch_size * (
        schedule.get("seq_len") or 0)
    batches_per_epoch = schedule.get("batches_per_epoch")
    epoch_times = [float(r["epoch_time_s"]) for r in evals
                   if r.get("epoch_end") and r.get("epoch_time_s") is not None]
    if epoch_times:
        epoch_time, basis = statistics.fmean(epoch_times), "measured"
    elif train_time and steps and batches_per_epoch:
        epoch_time, basis = train_time / steps * batches_per_epoch, "extrapolated"
    else:
        epoch_time, basis = None, None
    counts = parameter_counts(run.model, run.preset, run.model_kwargs())
    data = config.get("data", {})
    return {
        "model_name": run.model,
        "model_preset": run.preset,
        "overrides": dict(run.model_overrides),
        "params_total": counts["total"],
        "params_non_embedding": counts["non_embedding"],
        "steps": steps,
        "total_steps": schedule.get("total_steps"),
        "batches_per_epoch": batches_per_epoch,
        "epochs_completed": len(epoch_times),
        "epochs_trained": (steps / batches_per_epoch) if batches_per_epoch else None,
        "tokens_per_step": tokens_per_step,
        "train_tokens": steps * tokens_per_step if tokens_per_step else None,
        "train_time_s": train_time,
        "epoch_time_s": epoch_time,
        "epoch_times_s": epoch_times,
        "epoch_time_basis": basis,
        "time_per_step_s": (train_time / steps) if train_time and steps else None,
        "tokens_per_s": (steps * tokens_per_step / train_time)
        if train_time and steps and tokens_per_step else None,
        "val_loss": final.get("val_loss"),
        "val_ppl": final.get("val_ppl"),
        "val_tokens": final.get("val_tokens"),
        "final_train_loss": trains[-1].get("loss") if trains else None,
        "evals": len(evals),
        "seq_len": schedule.get("seq_len"),
        "batch_size": run.train.batch_size,
        "dtype": run.train.dtype,
        "tokenizer_sha256": file_sha256(run_dir / "tokenizer.json"),
        "vocab_size": config.get("tokenizer", {}).get("actual_vocab_size"),
        "data_fingerprints": data.get("fingerprints"),
        "data_tokens": data.get("tokens"),
        "data_seed": run.train.seed,
    }


def execute_run(spec: RunSpec, protocol: Protocol, out: Path, data_dir: str | None,
                options, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; return its row. Never raises for a failed run:
    the row then has ``status`` ``error`` / ``diverged`` and the message."""
    from gam.training import RunConfig, TrainingDivergedError, resume, train
    from gam.training.run import read_run_config

    run_dir = run_dir_of(out, spec)
    row: dict[str, Any] = {"dataset": spec.dataset, "model": spec.label, "seed": spec.seed,
                           "group": spec.group, **spec.extra, "run_dir": str(run_dir),
                           "status": "ok"}
    requested = run_config_of(protocol, spec, data_dir)
    t0 = time.perf_counter()
    try:
        state, step, total = run_state(run_dir)
        if state != "absent":
            found = RunConfig.from_dict(read_run_config(run_dir)).to_dict()
            diff = _differences(_comparable(requested.to_dict()), _comparable(found))
            if diff:
                raise ValueError(f"{run_dir} already holds a run with another configuration "
                                 f"({'; '.join(diff[:5])}); use another --out or remove that "
                                 f"folder")
        if state == "finished":
            row["action"] = "reused"
            log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] reusing the finished run "
                f"in {run_dir} ({step}/{total} steps)")
        elif state == "partial":
            row["action"] = "resumed"
            row["resumed_from_step"] = step
            log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] resuming {run_dir} at "
                f"step {step}/{total}")
            # the data is read from where it is now, not necessarily where it was recorded
            resume(run_dir, replace(options, data_dir=data_dir) if data_dir else options)
        else:
            row["action"] = "trained"
            log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] training -> {run_dir}")
            train(requested, run_dir, options)
        row.update(summarize_run_dir(run_dir))
    except TrainingDivergedError as exc:
        row.update(status="diverged", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one failed run does not stop the benchmark
        row.update(status="oom" if common.is_oom_error(exc) else "error",
                   error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc()[-2000:])
        log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] FAILED: "
            f"{type(exc).__name__}: {exc}")
    row["wall_s"] = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------------- summary
SUMMARY_FIELDS = ("val_loss", "val_ppl", "epoch_time_s", "tokens_per_s", "time_per_step_s")


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and *sample* standard deviation (n - 1) of the finite values; std is None with
    fewer than two values."""
    vals = [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return None, None, 0
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return mean, std, len(vals)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, model) over the seeds that finished: mean and sample std of
    ``SUMMARY_FIELDS``, parameter counts, and the seeds used."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"]), []).append(row)
    out = []
    for (dataset, model), members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        entry: dict[str, Any] = {
            "dataset": dataset, "model": model,
            "group": members[0].get("group"),
            "seeds": [r["seed"] for r in ok],
            "failed_seeds": [r["seed"] for r in members if r.get("status") != "ok"],
            "n": len(ok),
        }
        for key in ("model_name", "overrides", "params_total", "params_non_embedding", "steps",
                    "epoch_time_basis"):
            entry[key] = ok[0].get(key) if ok else None
        for key in SUMMARY_FIELDS:
            mean, std, _ = mean_std([r.get(key) for r in ok])
            entry[f"{key}_mean"] = mean
            entry[f"{key}_std"] = std
        out.append(entry)
    return out


def protocol_check(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset: did all finished runs get the same tokenizer, data, steps and (per seed)
    data order?"""
    out: dict[str, dict[str, Any]] = {}
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_dataset.setdefault(row["dataset"], []).append(row)
    for dataset, members in by_dataset.items():
        def distinct(key: str, members=members) -> list[Any]:
            seen: list[Any] = []
            for r in members:
                if r.get(key) not in seen:
                    seen.append(r.get(key))
            return seen

        out[dataset] = {
            "runs": len(members),
            "identical_tokenizer": len(distinct("tokenizer_sha256")) == 1,
            "identical_data": len(distinct("data_fingerprints")) == 1
            and len(distinct("data_tokens")) == 1,
            "identical_steps": len(distinct("steps")) == 1
            and len(distinct("total_steps")) == 1,
            "identical_batches": len(distinct("tokens_per_step")) == 1,
            "steps": distinct("steps"),
            "tokenizer_sha256": distinct("tokenizer_sha256"),
        }
    return out


# ---------------------------------------------------------------------------------- output
def ngram_markdown(info: dict[str, Any]) -> list[str]:
    """Lines that set the count-based baselines of a dataset beside the models."""
    base = info.get("ngram_baselines")
    if not base:
        return []
    return ["", f"Count baselines on the same tokens (`gam.bench.ngram`): unigram val loss "
                f"{base['unigram_loss']:.4f} (ppl {base['unigram_ppl']:.2f}); smoothed bigram "
                f"val loss {base['bigram_loss']:.4f} (ppl {base['bigram_ppl']:.2f}). A model "
                f"at the unigram figure has learned token frequencies and no context."]


def fmt_pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    text = common.fmt(mean, digits)
    if std is not None:
        text += f" ± {common.fmt(std, digits)}"
    return text


def fmt_params(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def plot_curves(rows: Sequence[dict[str, Any]], dataset: str, path: Path,
                title: str) -> Path | None:
    """Train loss vs step and validation loss per evaluation, every run of ``dataset`` on one
    figure (one colour per model, one line style per seed)."""
    from gam.training import read_metrics

    runs = [r for r in rows if r["dataset"] == dataset and r.get("status") == "ok"]
    if not runs:
        return None
    fig, (ax_train, ax_val) = common.new_figure(ncols=2)
    colors = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    models = list(dict.fromkeys(r["model"] for r in runs))
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    for r in runs:
        color = colors[models.index(r["model"]) % len(colors)]
        style = styles[seeds.index(r["seed"]) % len(styles)]
        label = r["model"] if len(seeds) == 1 else f"{r['model']} (seed {r['seed']})"
        train = read_metrics(r["run_dir"], kind="train")
        evals = read_metrics(r["run_dir"], kind="eval")
        if train:
            ax_train.plot([t["step"] for t in train], [t["loss"] for t in train], style,
                          color=color, label=label, linewidth=1.2)
        if evals:
            ax_val.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], style,
                        color=color, marker="o", markersize=3, label=label)
    ax_train.set_title(f"training loss ({title})")
    ax_val.set_title(f"validation loss per evaluation ({title})")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def protocol_markdown(protocol: Protocol, seeds: Sequence[int]) -> str:
    p = protocol
    steps = f"max {p.max_steps} steps" if p.max_steps else "no step cap"
    return (f"Protocol `{p.name}`: {p.description}. Settings: model preset `{p.model_preset}`, "
            f"tokenizer `{p.tokenizer}` (vocab {p.vocab_size}"
            f"{', trained on all splits' if p.tokenizer_on_all_splits else ''}), seq_len "
            f"{p.seq_len}, batch {p.batch_size}, {p.epochs} epoch(s), {steps}, lr {p.lr:g} "
            f"(warm-up {p.warmup_steps}), dtype {p.dtype}, rows train/val "
            f"{p.max_train_rows}/{p.max_val_rows}, eval every {p.eval_every or 'epoch'}; "
            f"seeds {list(seeds)}. Identical data, tokenizer, steps and data order for every "
            f"model.")


class Benchmark:
    """Runs specs under one protocol and keeps the rows; the front ends (compare, ablate)
    decide what to run and how to present it."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        from gam.training import RuntimeOptions

        self.args = args
        self.command = command
        self.protocol = resolve_protocol(args)
        self.seeds = seeds_of(args)
        self.out = Path(args.out)
        self.data_dir, self.data_dir_explicit = resolve_data_dir(
            getattr(args, "data_dir", None))
        self.data_dirs: dict[str, str | None] = {}  # per dataset: where it was found
        self.cache_dir = getattr(args, "cache_dir", None)
        self.device = common.resolve_device(args.device)
        self.threads = common.setup_threads(args.threads)
        self.options = RuntimeOptions(device=args.device, threads=args.threads,
                                      quiet=bool(args.quiet), progress=None,
                                      cache_dir=self.cache_dir)
        self.rows: list[dict[str, Any]] = []
        self.datasets: dict[str, dict[str, Any]] = {}
        self.started = time.perf_counter()

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(f"gam bench {self.command}: {text}", file=sys.stderr, flush=True)

    def prepare(self, dataset: str) -> dict[str, Any]:
        data_dir = self.data_dir
        try:
            info = prepare_dataset(self.protocol, dataset, data_dir, self.cache_dir)
            info["status"] = "ok"
            info["data_dir"] = data_dir
            self.data_dirs[dataset] = data_dir
            self.log(f"{dataset}: tokenizer ready ({info['vocab_size']} tokens), "
                     f"{info['tokens']['train']:,} train / {info['tokens']['valid']:,} "
                     f"validation tokens")
        except Exception as exc:  # noqa: BLE001 - reported, the other datasets still run
            info = {"dataset": dataset, "status": "error", "note": DATASET_NOTES.get(dataset),
                    "error": f"{type(exc).__name__}: {common.error_text(exc)}"}
            self.log(f"{dataset}: cannot be loaded: {type(exc).__name__}: "
                     f"{common.error_text(exc)}")
        self.datasets[dataset] = info
        return info

    def run(self, spec: RunSpec, write: Callable[[], None] | None = None) -> dict[str, Any]:
        info = self.datasets.get(spec.dataset)
        if info is None:
            info = self.prepare(spec.dataset)
        if info.get("status") != "ok":
            row = {"dataset": spec.dataset, "model": spec.label, "seed": spec.seed,
                   "group": spec.group, **spec.extra,
                   "run_dir": str(run_dir_of(self.out, spec)),
                   "status": "error", "action": "skipped",
                   "error": f"dataset unavailable: {info.get('error')}"}
        else:
            row = execute_run(spec, self.protocol, self.out, self.data_dirs.get(spec.dataset),
                              self.options, self.log)
            if row.get("status") == "ok":
                self.log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] val loss "
                         f"{common.fmt(row.get('val_loss'), 4)}, ppl "
                         f"{common.fmt(row.get('val_ppl'), 2)}, "
                         f"{common.fmt(row.get('tokens_per_s'), 0)} tok/s")
        self.rows.append(row)
        if write is not None:
            write()  # partial results survive an interruption
        return row

    def base_results(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.to_dict(),
            "seeds": self.seeds,
            "data_dir": self.data_dir,
            "datasets": self.datasets,
            "runs": self.rows,
            "summary": summarize(self.rows),
            "protocol_check": protocol_check(self.rows),
            "total_wall_s": time.perf_counter() - self.started,
            "environment": common.environment(self.device, self.threads),
            "command": common.command_line(self.command, getattr(self.args, "argv", [])),
        }

    def finish(self, out: Path, res: dict[str, Any], plots: list[str],
               build_markdown: Callable[[dict[str, Any]], str]) -> int:
        """Write the final results with their plots, print the table, return the exit code."""
        res["plots"] = plots
        common.write_results(out, res, build_markdown(res))
        print(build_markdown(res))
        print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}"
              + (f" and {', '.join(plots)}" if plots else ""))
        return self.exit_code()

    def exit_code(self) -> int:
        return 0 if self.rows and all(r.get("status") == "ok" for r in self.rows) else 1
