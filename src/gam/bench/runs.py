"""The runs of a training benchmark (``gam bench compare`` / ``ablate``): one
``gam.training.train`` run per (dataset, model, seed), with the *same* data, tokenizer, steps and
seed for every model; only the model (``build_model`` name and config overrides) changes.

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
  (nothing is overwritten). The configuration is the ``RunConfig`` and the model config it
  builds now (``model_differences``): a run recorded before a family's default changed, or
  before a field existed that it lacks and whose legacy value is not today's, is another
  configuration. So an interrupted benchmark is re-run with the same command.

Results per run (one row each, ``summarize_run_dir``, read from the run folder only):
parameters (total and without embeddings), optimizer steps, average training time per epoch
(training steps only, as the trainer measures it: measured over complete epochs, or
extrapolated from the time per step when the budget ends before the first epoch does;
``epoch_time_basis`` says which), training tokens/s, final validation loss and perplexity (the
library's token-weighted evaluation at the last step).
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gam.bench.ngram import ngram_baselines
from gam.bench.protocols import DATASET_NOTES, Protocol
from gam.data import encode_corpus, load_corpus, train_tokenizer
from gam.data.tokenizer import tokenizer_hash
from gam.errors import is_oom_error
from gam.files import as_json, sha256_file
from gam.models.io import MODEL_JSON
from gam.models.registry import (
    count_parameters,
    model_config,
    model_from_config,
    recorded_config,
)
from gam.training import (
    RunConfig,
    RuntimeOptions,
    TrainingDivergedError,
    read_metrics,
    resume,
    train,
)
from gam.training.checkpoint import find_checkpoint, read_state
from gam.training.rundir import (
    TOKENIZER_FILE,
    RunBusyError,
    dataset_slug,
    is_run_dir,
    read_run_config,
    recorded_data,
    recorded_schedule,
    recorded_vocab_size,
)

__all__ = ["RunSpec", "apply_model_args", "check_models", "execute_run", "model_differences",
           "parameter_counts", "prepare_dataset", "run_dir_of", "run_state", "summarize_run_dir"]


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


def apply_model_args(specs: Sequence[RunSpec], args: argparse.Namespace) -> None:
    """Merge ``--model-arg`` overrides into every spec (a spec's own overrides, such as the
    ablation's slot sweep, win)."""
    common_overrides = dict(getattr(args, "model_args", None) or [])
    for spec in specs:
        spec.overrides = {**common_overrides, **spec.overrides}


def run_dir_of(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / dataset_slug(spec.dataset) / f"{spec.label}-seed{spec.seed}"


def check_models(specs: Sequence[RunSpec], protocol: Protocol) -> None:
    """ValueError for an unknown model name, preset or override before anything is trained."""
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
    t0 = time.perf_counter()
    corpus = load_corpus(dataset, data_dir, protocol.max_train_rows, protocol.max_val_rows)
    tokenizer = train_tokenizer(corpus, kind=protocol.tokenizer_kind,
                                vocab_size=protocol.vocab_size,
                                on_all_splits=protocol.tokenizer_on_all_splits,
                                cache_dir=cache_dir)
    ids = encode_corpus(corpus, tokenizer, cache_dir=cache_dir, splits=["train", "valid"])
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
def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a RunConfig dict that must match for a run to be reused (not where the
    data lives)."""
    config = as_json(config)
    config.get("data", {}).pop("data_dir", None)
    return config


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {b!r} (found) vs {a!r} (requested)"]


def model_differences(requested: RunConfig, record: dict[str, Any]) -> list[str]:
    """How the model ``requested`` would build now differs from the one a run folder's
    ``config.json`` ``record`` holds (``[]``: the same). A field the record lacks means its
    legacy value (``recorded_config``): a run made before a family's default changed does not
    pass for one under the new default. Assumes the records name the same model family."""
    recorded = record.get("model_config")
    if not isinstance(recorded, dict):
        return ["model_config: none recorded"]
    wanted = model_config(requested.model, requested.model_preset, **requested.model_kwargs())
    try:
        found = recorded_config(requested.model, recorded)
    except (TypeError, ValueError) as exc:
        return [f"model_config: does not build a {requested.model!r} model now ({exc})"]
    return _differences(as_json(wanted.to_dict()), as_json(found.to_dict()), "model_config.")


def run_state(run_dir: Path) -> tuple[str, int | None, int | None]:
    """``("absent" | "partial" | "finished", step, total_steps)`` of a run folder."""
    if not is_run_dir(run_dir):
        return "absent", None, None
    total = recorded_schedule(read_run_config(run_dir)).get("total_steps")
    ckpt = find_checkpoint(run_dir)
    step = read_state(ckpt).step if ckpt is not None else 0
    if total is not None and step >= total and (run_dir / MODEL_JSON).is_file():
        return "finished", step, total
    return "partial", step, total


def file_sha256(path: Path) -> str | None:
    """:func:`gam.files.sha256_file`, None when the file cannot be read."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def parameter_counts(model: str, preset: str, overrides: dict[str, Any]) -> dict[str, int]:
    """Total and non-embedding parameters of a model, counted on the meta device (nothing is
    allocated)."""
    config = model_config(model, preset, **overrides)
    with torch.device("meta"):
        built = model_from_config(model, config)
    return count_parameters(built)


def summarize_run_dir(run_dir: Path) -> dict[str, Any]:
    """The benchmark row of a finished run folder, read from its files only (the same for a run
    trained now, resumed or reused)."""
    config = read_run_config(run_dir)
    run = RunConfig.from_dict(config)
    schedule = recorded_schedule(config)
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
    counts = parameter_counts(run.model, run.model_preset, run.model_kwargs())
    data = recorded_data(config)
    return {
        "model_name": run.model,
        "model_preset": run.model_preset,
        "overrides": dict(run.model_arg),
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
        "tokenizer_sha256": file_sha256(run_dir / TOKENIZER_FILE),
        "vocab_size": recorded_vocab_size(config),
        "data_fingerprints": data.get("fingerprints"),
        "data_tokens": data.get("tokens"),
        "data_seed": run.train.seed,
    }


def execute_run(spec: RunSpec, protocol: Protocol, out: Path, data_dir: str | None,
                options: RuntimeOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; return its row. Never raises for a failed run:
    the row then has ``status`` ``error`` / ``diverged`` and the message."""
    run_dir = run_dir_of(out, spec)
    row: dict[str, Any] = {"dataset": spec.dataset, "model": spec.label, "seed": spec.seed,
                           "group": spec.group, **spec.extra, "run_dir": str(run_dir),
                           "status": "ok"}
    requested = protocol.run_config(spec.model, spec.dataset, spec.seed, spec.overrides,
                                    data_dir)
    t0 = time.perf_counter()
    try:
        state, step, total = run_state(run_dir)
        if state != "absent":
            record = read_run_config(run_dir)
            found = RunConfig.from_dict(record).to_dict()
            diff = (_differences(comparable_config(requested.to_dict()), comparable_config(found))
                    or model_differences(requested, record))
            if diff:
                raise ValueError(f"{run_dir} already holds a run with another configuration "
                                 f"({'; '.join(diff[:5])}); it is left as it is (`gam train "
                                 f"--resume` and `gam eval` use it as recorded): give another "
                                 f"--out to train under these settings")
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
            resume(run_dir, options, data_dir=data_dir or None)
        else:
            row["action"] = "trained"
            log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] training -> {run_dir}")
            train(requested, run_dir, options)
        row.update(summarize_run_dir(run_dir))
    except TrainingDivergedError as exc:
        row.update(status="diverged", error=str(exc))
    except RunBusyError as exc:  # another benchmark process is training this very run
        row.update(status="not run", action="skipped", error=str(exc))
        log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - one failed run does not stop the benchmark
        row.update(status="oom" if is_oom_error(exc) else "error",
                   error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc()[-2000:])
        log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] FAILED: "
            f"{type(exc).__name__}: {exc}")
    row["wall_s"] = time.perf_counter() - t0
    return row
