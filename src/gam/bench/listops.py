"""``gam bench listops``: Long Range Arena ListOps (Tay et al. 2021) for any registry family.

Data: ``gam.data.listops`` (the published generator: MIN / MAX / MED / SM over digits, up to
10 levels and 10 arguments, lengths kept by rejection, splits distinct), generated once per
``(sizes, lengths, --seed)`` into the gam cache (``$GAM_CACHE_DIR/listops/``); every run of a
benchmark reads the same arrays.

Model: ``gam.build_model(name, ...)`` with the ListOps vocabulary (16 ids, 0 = padding) and
``max_seq_len = max_len``; a ``Linear(d_model, 10)`` head reads the final normalised hidden
state (``model.hidden_states``) at each sequence's last real token. Sequences are right-padded
(to the longest of the batch): a causal model's state at the last real token does not depend on
the padding after it, so no mask is needed, and the last token has seen the whole expression.
LRA's encoders pool over a bidirectional encoding instead; a causal reading at the end is the
natural equivalent for decoder-only models. ``--readout mean`` averages the final hidden states
over the real tokens instead (LRA's pooling, applied to the causal states).

Training: the library's AdamW (``gam.training.optim``: betas (0.9, 0.95), weight decay on
matrices only, the ``nanogpt`` filter), linear warm-up then cosine decay to 0 over ``--steps``,
gradient clipping at 1, cross-entropy on the 10 classes, shuffled epochs over the training
split. Validation accuracy every ``--eval-every`` steps gives the learning curve; the weights
with the best validation accuracy are kept, and the reported test accuracy is that of the
best-validation weights (as LRA reports), with the final weights' test accuracy beside it.

Every (model, seed) is trained in a fresh ``python -m gam.bench.listops --worker`` process
(``run_worker``), so one family's memory or crash cannot affect another's numbers. The
result of each run is written to ``OUT/runs/<model>-seed<k>.json`` as soon as it finishes and
``results.json`` / ``results.md`` / ``listops.png`` are rewritten after every run, so an
interrupted benchmark loses at most the run in progress; rerunning the same command reuses the
finished runs whose settings match (``action: reused``) and trains the others.

Protocols (``--preset``; every number can be overridden by its option):

- ``cpu``: sized for a 2-core CPU, one thread: lengths 100-500 (LRA: 500-2000), 20,000 /
  500 / 1,000 sequences, d 64, 4 layers (GAM: 64 memory slots; Transformer: 4 heads; Mamba:
  d_state 16, expand 2), batch 32, 800 steps (1.3 epochs), lr 2e-3, 100 warm-up steps,
  validation every 100 steps. Measured on an idle core: 0.29 / 0.35 / 0.43 s per step for
  GAM / Transformer / Mamba, i.e. 4-6 minutes per (model, seed) with the evaluations (about
  twice that when other jobs share the cores);
- ``lra``: LRA's data (500-2000 tokens, 96,000 / 2,000 / 2,000), a model of LRA's baseline
  width (the ``paper`` preset: d 512, 6 layers, 8 heads), batch 32, 5,000 steps, lr 1e-4,
  1,000 warm-up steps, validation every 250 steps. Meant for a GPU;
- ``--quick``: a smoke test (lengths 10-40, a few hundred sequences, d 32, 1 layer, 20 steps).

Position embeddings start at N(0, 0.02) (``--pos-embedding-std``; 0 removes them), not the
shell's default N(0, 1), which on this project's other tasks drowned the token identities
(see ``gam.bench.recall``).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.bench import common
from gam.bench.environment import command_line, environment, finish_environment
from gam.bench.listops_report import READOUT_WORDS, write_listops_results
from gam.bench.tasks import (
    Configuration,
    add_protocol_options,
    add_rerun_options,
    check_model_names,
    check_rerun_options,
    family_overrides,
    progress_log,
    protocol_overrides,
    resolve_preset,
)
from gam.bench.workers import emit, worker_main
from gam.data import listops
from gam.models.registry import (
    MODELS,
    build_model,
    count_parameters,
    model_config,
    receptive_field,
)
from gam.runtime import autocast_context, resolve_device
from gam.training.argtypes import parse_model_arg
from gam.training.config import DTYPES, TrainConfig
from gam.training.optim import build_optimizer, build_scheduler

DEFAULT_MODELS = ["gam", "transformer", "mamba"]
BUCKET_BATCHES = 16  # batches whose rows are sorted together by length (see epoch_batches)


@dataclass(frozen=True)
class Protocol:
    """Everything a run of the benchmark depends on, besides the model name and seed."""

    min_len: int
    max_len: int
    n_train: int
    n_valid: int
    n_test: int
    max_depth: int
    model_preset: str
    d_model: int
    n_layers: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    eval_every: int
    eval_batch_size: int
    dropout: float
    pos_embedding_std: float
    dtype: str
    readout: str = "last"  # last real token, or the mean over the real tokens (READOUTS)


READOUTS = tuple(READOUT_WORDS)  # ("last", "mean")
# fields added after records existed: left out of a run's key at their default, so the
# records written before them are reused
_KEY_DEFAULTS = {"readout": "last"}


def protocol_key(p: Protocol) -> dict[str, Any]:
    """The protocol's part of a run's key."""
    key = asdict(p)
    for name, default in _KEY_DEFAULTS.items():
        if key[name] == default:
            del key[name]
    return key


PROTOCOLS: dict[str, Protocol] = {
    "cpu": Protocol(min_len=100, max_len=500, n_train=20_000, n_valid=500, n_test=1_000,
                    max_depth=10, model_preset="cpu-small", d_model=64, n_layers=4,
                    batch_size=32, steps=800, lr=2e-3, warmup_steps=100, weight_decay=0.1,
                    eval_every=100, eval_batch_size=100, dropout=0.0, pos_embedding_std=0.02,
                    dtype="fp32"),
    "lra": Protocol(min_len=500, max_len=2000, n_train=96_000, n_valid=2_000, n_test=2_000,
                    max_depth=10, model_preset="paper", d_model=512, n_layers=6, batch_size=32,
                    steps=5_000, lr=1e-4, warmup_steps=1_000, weight_decay=0.1, eval_every=250,
                    eval_batch_size=64, dropout=0.1, pos_embedding_std=0.02, dtype="fp32"),
    "quick": Protocol(min_len=10, max_len=40, n_train=256, n_valid=64, n_test=64, max_depth=10,
                      model_preset="tiny", d_model=32, n_layers=1, batch_size=16, steps=20,
                      lr=3e-3, warmup_steps=4, weight_decay=0.1, eval_every=10,
                      eval_batch_size=64, dropout=0.0, pos_embedding_std=0.02, dtype="fp32"),
}
OPTION_HELP = {  # the protocol's options, each overriding the preset's field
    "steps": "optimizer steps per run", "batch_size": "sequences per step",
    "lr": "peak learning rate (AdamW)", "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay (matrices only)", "d_model": "model width",
    "n_layers": "number of blocks", "dropout": "dropout in the backbone",
    "pos_embedding_std": "std of the learned position embeddings at init; 0 = none",
    "dtype": "autocast dtype (fp16 on CUDA only)", "min_len": "shortest sequence (tokens)",
    "max_len": "longest sequence (tokens)", "max_depth": "levels of a tree (LRA: 10)",
    "n_train": "training sequences", "n_valid": "validation sequences",
    "n_test": "test sequences",
    "eval_every": "steps between validation evaluations (the learning curve)",
    "readout": "what the 10-way head reads: the final hidden state at the last real token "
               "(a causal model's summary of the whole expression) or the mean over the real "
               "tokens (LRA's pooling)"}


def resolve_protocol(args: argparse.Namespace) -> tuple[str, Protocol]:
    name = "quick" if args.quick else args.preset
    p = resolve_preset(PROTOCOLS, name, protocol_overrides(args, OPTION_HELP),
                       at_least_one=("min_len", "n_train", "n_valid", "n_test", "max_depth",
                                     "d_model", "n_layers", "batch_size", "steps",
                                     "eval_every"))
    if p.n_train < p.batch_size:
        raise ValueError(f"--n-train {p.n_train} is smaller than --batch-size {p.batch_size}")
    if p.max_len < p.min_len:
        raise ValueError(f"--max-len {p.max_len} is smaller than --min-len {p.min_len}")
    return name, p


# ---------------------------------------------------------------------------- the model
def _family_overrides(name: str, d_model: int) -> dict[str, Any]:
    """GAM gets d_model memory slots (the paper's ratio), Mamba d_state 16 and expand 2, S4D
    N 64 (the S4D paper's at LRA), the Transformer 4 heads of d/4 (8 from the paper preset at
    d 512), the delta rules a chunk of 32 below d 512 (their heads are small there: the same
    function, ~37% less time per step at d 64 than the library's 64, docs/results.md): only
    the fields a family has are passed."""
    wanted = {"num_memory_slots": d_model, "d_state": 16, "state_size": 64}
    if d_model < 512:
        wanted.update(n_heads=4, expand=2, delta_chunk_size=32)
    return family_overrides(name, wanted)


class ListOpsClassifier(nn.Module):
    """A causal backbone read out by a 10-way linear head: at each row's last real token
    (``readout="last"``) or averaged over its real tokens (``"mean"``)."""

    def __init__(self, backbone: nn.Module, num_classes: int = listops.NUM_CLASSES,
                 readout: str = "last") -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.backbone = backbone
        self.readout = readout
        self.classifier = nn.Linear(backbone.config.d_model, num_classes)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h, _ = self.backbone.hidden_states(idx)  # (B, T, C), final norm applied
        if self.readout == "last":
            pooled = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, C)
        else:  # right padding: positions < length are real
            real = torch.arange(idx.shape[1], device=idx.device) < lengths[:, None]  # (B, T)
            pooled = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        return self.classifier(pooled)  # (B, 10)


def backbone_overrides(name: str, p: Protocol, model_args: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The ``build_model`` overrides of a backbone: the protocol's sizes, then ``--model-arg``
    (e.g. ``init=paper``)."""
    # learned positions only for a family that has them: rotary, convolutional and recurrent
    # families (transformer-pp, s4d, gated-deltanet, rwkv7) keep their own design
    std = p.pos_embedding_std if model_config(name, p.model_preset).pos_embedding else 0.0
    return {"vocab_size": listops.VOCAB_SIZE, "max_seq_len": p.max_len, "d_model": p.d_model,
            "n_layers": p.n_layers, "dropout": p.dropout, "pos_embedding": std > 0,
            "pos_embedding_std": std if std > 0 else None,
            **_family_overrides(name, p.d_model), **(model_args or {})}


def backbone_config(name: str, p: Protocol, model_args: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The backbone's whole resolved config (init and tying included): part of a run's key,
    so that a finished run is reused only for the same model."""
    return model_config(name, p.model_preset, **backbone_overrides(name, p, model_args)).to_dict()


def build_classifier(name: str, p: Protocol, model_args: dict[str, Any] | None = None
                     ) -> ListOpsClassifier:
    backbone = build_model(name, p.model_preset, **backbone_overrides(name, p, model_args))
    return ListOpsClassifier(backbone, readout=p.readout)


# ------------------------------------------------------------------------------ training
def _batch(split: listops.ListOpsSplit, rows: np.ndarray, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = split.lengths[rows]
    t = int(lengths.max())  # crop the padding to the longest row of the batch
    x = torch.from_numpy(split.tokens[rows, :t].astype(np.int64)).to(device)
    n = torch.from_numpy(lengths.astype(np.int64)).to(device)
    y = torch.from_numpy(split.labels[rows]).to(device)
    return x, n, y


@torch.no_grad()
def accuracy(model: ListOpsClassifier, split: listops.ListOpsSplit, batch_size: int,
             device: torch.device, dtype: str = "fp32") -> float:
    """Accuracy over a whole split; rows batched by length so that little padding is run."""
    was_training = model.training
    model.eval()
    order = np.argsort(split.lengths, kind="stable")
    correct = 0
    for i in range(0, len(order), batch_size):
        x, n, y = _batch(split, order[i:i + batch_size], device)
        with autocast_context(device, dtype):
            logits = model(x, n)
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(split))


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  bucket: int = BUCKET_BATCHES) -> list[np.ndarray]:
    """One epoch of batches (full batches only): shuffle, sort each window of ``bucket``
    batches by length, cut it into batches, shuffle the batches. Rows of similar length share a
    batch, so much less padding is run (about 40% less at 100-500 tokens) while every batch
    is still a random draw of the split."""
    order = rng.permutation(len(lengths))
    batches = []
    window = batch_size * bucket
    for i in range(0, len(order) - batch_size + 1, window):
        chunk = order[i:i + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk) - batch_size + 1,
                                                           batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_and_evaluate(name: str, seed: int, p: Protocol, splits: dict[str, Any],
                       device: torch.device, log=print,
                       model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one model on the train split; return its learning curve and test accuracies."""
    torch.manual_seed(seed)
    model = build_classifier(name, p, model_args).to(device).train()
    cfg = TrainConfig(batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                      decay_filter="nanogpt", warmup_steps=p.warmup_steps, grad_clip=1.0,
                      dtype=p.dtype, seed=seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, p.steps)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    curve: list[dict[str, Any]] = []
    best = {"valid_accuracy": -1.0, "step": 0, "state": None}
    real_tokens = run_tokens = 0
    train_seconds = 0.0
    recent_loss: list[float] = []
    for step in range(1, p.steps + 1):
        if not batches:  # a new epoch, reshuffled
            batches = epoch_batches(train.lengths, p.batch_size, rng)
        rows = batches.pop()
        t0 = time.perf_counter()
        x, n, y = _batch(train, rows, device)
        with autocast_context(device, p.dtype):
            logits = model(x, n)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss)  # syncs, so the step time below is complete on a GPU too
        train_seconds += time.perf_counter() - t0
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        real_tokens += int(n.sum())
        run_tokens += x.numel()
        recent_loss.append(loss_value)
        if step % p.eval_every == 0 or step == p.steps:
            acc = accuracy(model, valid, p.eval_batch_size, device, p.dtype)
            train_loss = statistics.fmean(recent_loss)
            recent_loss = []
            curve.append({"step": step, "valid_accuracy": acc, "train_loss": train_loss,
                          "train_seconds": train_seconds})
            if acc > best["valid_accuracy"]:
                best = {"valid_accuracy": acc, "step": step,
                        "state": copy.deepcopy(model.state_dict())}
            log(f"    {name} seed {seed} step {step}: train loss {train_loss:.3f}, valid "
                f"accuracy {100 * acc:.1f}%, {train_seconds:.0f} s")
    final_test = accuracy(model, test, p.eval_batch_size, device, p.dtype)
    model.load_state_dict(best["state"])
    best_test = accuracy(model, test, p.eval_batch_size, device, p.dtype)
    params = count_parameters(model.backbone)
    return {
        "test_accuracy": best_test, "test_accuracy_final": final_test,
        "best_valid_accuracy": best["valid_accuracy"], "best_step": best["step"],
        "final_valid_accuracy": curve[-1]["valid_accuracy"],
        "receptive_field": receptive_field(model.backbone),
        "parameters": params["total"] + sum(q.numel() for q in model.classifier.parameters()),
        "parameters_non_embedding": params["non_embedding"],
        "steps": p.steps, "train_seconds": train_seconds,
        "tokens_per_s": real_tokens / train_seconds if train_seconds else None,
        "positions_per_s": run_tokens / train_seconds if train_seconds else None,
        "train_tokens": real_tokens, "curve": curve,
        "model_config": model.backbone.config.to_dict(),
    }


def load_splits(p: Protocol, data_seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    return listops.load_or_make_dataset(p.n_train, p.n_valid, p.n_test, p.min_len, p.max_len,
                                        data_seed, max_depth=p.max_depth)


def _worker(payload: dict[str, Any]) -> None:
    device = torch.device(payload["device"])
    p = Protocol(**payload["protocol"])
    splits, _ = load_splits(p, payload["data_seed"])
    t0 = time.perf_counter()
    result = train_and_evaluate(payload["model"], payload["seed"], p, splits, device,
                                log=progress_log(payload), model_args=payload.get("model_args"))
    emit({"status": "ok", "wall_seconds": time.perf_counter() - t0, **result})


# ------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME",
                        help="registry names (gam.build_model), any family")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], metavar="K",
                        help="training seeds (initialisation and batch order); the data "
                             "depends on --seed only")
    parser.add_argument("--preset", choices=("cpu", "lra"), default="cpu",
                        help="protocol: cpu (lengths 100-500, d 64, 4 layers, 800 steps: 4-6 "
                             "min per model and seed on one idle thread) or lra (500-2000 tokens, "
                             "96k/2k/2k, d 512, 6 layers; for a GPU); --quick overrides it")
    g = parser.add_argument_group("protocol overrides (default: the --preset's value)")
    add_protocol_options(g, Protocol, OPTION_HELP, choices={"dtype": DTYPES, "readout": READOUTS})
    g.add_argument("--model-arg", action="append", type=parse_model_arg, default=[],
                   metavar="KEY=VALUE", dest="model_args",
                   help="config override for every model (repeatable), e.g. init=paper "
                        "(default: none: the library's defaults)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="wall-clock limit of one (model, seed) run; the run is recorded "
                             "as a timeout (default: none)")
    add_rerun_options(parser, "OUT/runs")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    threads = common.setup_threads(args.threads)
    check_rerun_options(args)
    protocol_name, p = resolve_protocol(args)
    check_model_names(args.models)  # a typo fails now, not after an hour of other models
    command = command_line(args.command, args.argv)
    env = environment(device, threads)
    out = Path(args.out)
    print(f"gam bench listops: protocol {protocol_name}, models {args.models}, seeds "
          f"{args.seeds}, lengths {p.min_len}-{p.max_len}, {p.n_train}/{p.n_valid}/{p.n_test} "
          f"sequences, d {p.d_model}, {p.n_layers} layers, {p.steps} steps, device {device}, "
          f"{threads} threads", flush=True)
    splits, gen = load_splits(p, args.seed)
    n_gen = p.n_train + p.n_valid + p.n_test
    print(f"  data: {'loaded' if gen['cached'] else 'generated'} {n_gen} sequences in "
          f"{gen['seconds']:.1f} s ({gen['path']})", flush=True)
    test_counts = np.bincount(splits["test"].labels, minlength=listops.NUM_CLASSES)
    valid_counts = np.bincount(splits["valid"].labels, minlength=listops.NUM_CLASSES)
    cache_name = Path(gen["path"]).name  # its parameters and hash; the folder is the machine's
    data = {"cache": cache_name, "generation_seconds": None if gen["cached"] else gen["seconds"],
            "sequences_per_s": None if gen["cached"] else n_gen / gen["seconds"],
            "label_counts_test": test_counts.tolist(),
            "label_counts_train": np.bincount(splits["train"].labels,
                                              minlength=listops.NUM_CLASSES).tolist(),
            "majority_class": int(test_counts.argmax()),
            "majority_test": float(test_counts.max() / test_counts.sum()),
            "majority_valid": float(valid_counts.max() / valid_counts.sum()),
            "mean_length_train": float(splits["train"].lengths.mean())}
    settings = {"protocol_name": protocol_name, "protocol": asdict(p), "models": args.models,
                "seeds": args.seeds, "data_seed": args.seed, "device": str(device),
                "readout": f"Linear(d_model, 10) on the final normalised hidden states, "
                           f"read {READOUT_WORDS[p.readout]} (right padding)",
                "optimizer": "AdamW betas (0.9, 0.95), nanogpt decay filter, warm-up + cosine "
                             "to 0, clip 1.0",
                "reported": "test accuracy of the best-validation weights; final weights too"}
    results = {"command": command, "settings": settings, "data": data, "runs": [],
               "environment": env}
    del splits
    model_args = dict(getattr(args, "model_args", None) or [])
    try:  # every --model-arg against every model now, not after the first runs
        configs = {m: backbone_config(m, p, model_args) for m in args.models if m in MODELS}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--model-arg: {exc}") from None
    # seed-major order: an interrupted benchmark still has every model at the first seed
    for seed in args.seeds:
        for model in args.models:
            key = {"protocol": protocol_key(p), "model": model, "seed": seed,
                   "data_seed": args.seed, "device": device.type,
                   "model_config": configs.get(model)}
            config = Configuration(out / "runs" / f"{model}-seed{seed}.json", key)
            row: dict[str, Any] = {"model": model, "seed": seed}
            old = None if args.retrain else config.finished()
            if old is not None:
                row.update(old, action="reused")
                results["runs"].append(row)
                print(f"  {model} seed {seed}: reused {config.path}", flush=True)
                write_listops_results(out, results)
                continue
            reason = common.model_available(model)
            if reason is not None:
                row.update(status="unavailable", error=reason)
            elif args.report_only:
                row.update(status="not run", action="skipped")
            else:
                payload = {"model": model, "seed": seed, "protocol": asdict(p),
                           "model_args": model_args, "data_seed": args.seed,
                           "device": str(device), "threads": args.threads}
                row.update(config.run("gam.bench.listops", payload, timeout=args.max_seconds,
                                      record=False))
            results["runs"].append(row)
            if row["status"] == "ok":
                config.save(row)
                print(f"  {model} seed {seed}: test {100 * row['test_accuracy']:.1f}% (best "
                      f"valid {100 * row['best_valid_accuracy']:.1f}% at step "
                      f"{row['best_step']}; final {100 * row['test_accuracy_final']:.1f}%), "
                      f"rf {row['receptive_field']}, {row['tokens_per_s']:.0f} tokens/s, "
                      f"{row['wall_seconds']:.0f} s", flush=True)
            else:
                error = f": {row['error']}" if row.get("error") else ""
                print(f"  {model} seed {seed}: {row['status']}{error}", flush=True)
            results["environment"] = finish_environment(env)
            write_listops_results(out, results)
    results["environment"] = finish_environment(env)
    write_listops_results(out, results)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'listops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(_worker))
