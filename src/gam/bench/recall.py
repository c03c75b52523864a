"""``gam bench recall``: multi-query associative recall (MQAR), after zoology's protocol.

The task of the zoology benchmark (Arora et al. 2023, "Zoology: measuring and improving recall
in efficient language models"): a sequence starts with ``P`` key-value pairs
``k1 v1 k2 v2 ... kP vP`` (keys and values drawn without replacement from disjoint halves of
the vocabulary, token 0 excluded), followed by a query region where every key appears once
more, in random order, at a random even offset; the model must predict, at each query position,
the value that was paired with that key. Targets are ``-100`` everywhere else, so accuracy is
measured on query positions only. Positions of the query region that hold no query are random
tokens (zoology's ``random_non_queries``, the default here) or 0 (``--zero-filler``).

What it shows: recall needs a token to look up information from arbitrarily far back. GAM's
tokens mix only through its causal convolutions (the memory bank is the same learned matrix for
every sequence), so a GAM stack has a receptive field of ``1 + n_layers * (k - 1)`` tokens
(``gam.receptive_field(model)``, 5 for 2 layers with kernel 3) and cannot recall a pair seen
further back than that. Each result row records the receptive field and the fraction of queries
whose pair lies inside it (``reachable``). Attention (and, to the extent its state allows,
Mamba or a delta-rule memory) sees the whole context.

Protocol (zoology's, scaled to a CPU; every number is an option):

- **one model per sequence length**, trained on a mixture of that length's pair counts (each
  batch splits evenly between them; pair counts with ``8 P <= T``, i.e. the pairs fill at most
  a quarter of the sequence: T 64 -> 4, 8; T 128 and 256 -> 4, 8, 16), then evaluated per
  (length, pairs). Beside its own batch, every longer length also trains on the shorter
  cases of ``--mix`` (default 64 x 4 pairs; one micro-batch of ``tokens_per_step / 2``
  tokens per mixed length each step), as zoology's original MQAR training set mixes 64 x 4
  with the longer cases: trained alone, T 256 stays at the copy plateau at this budget
  (the Transformer and the textbook reference alike), with the short cases beside it is
  learned in a few thousand steps (docs/results.md). ``--mix`` with no case trains each length
  alone, as zoology's Figure 2 does;
- fresh random batches every step (``--tokens-per-step`` 2048: batch 32 at T 64, 16 at 128, 8
  at 256) for ``--steps`` 2000 steps, AdamW of the library (``gam.training.optim``: betas
  (0.9, 0.95), weight decay 0.1 on matrices only, the ``nanogpt`` filter), linear warm-up over
  10% of the steps then cosine to 0, gradient clipping 1.0, vocabulary 128, d 64, 2 layers,
  dropout 0;
- a **validation** set (256 sequences per pair count, its own fixed seed) is scored every
  ``--eval-every`` 100 steps; training stops early once every pair count reaches
  ``--target-accuracy`` 99% on it; the **test** set (1,000 sequences per pair count, another
  fixed seed) is scored once at the end. Training, validation and test draw from three
  generators seeded from (split, seed, length[, pairs]), so they are distinct streams;
- the **learning rate** is chosen per (model, length) from ``--lrs`` (1e-3 3e-3 1e-2) by the
  mean validation accuracy at the end of training (ties: the fewer steps); every sweep result
  is kept in ``configs`` and in the sweep table;
- the **copy plateau** 1/P (what copying any value of the context scores: the plateau before a
  model learns the association) and GAM's reachable fraction stand beside every accuracy.

Calibration (2-core Xeon shared with other jobs, 1 thread): the textbook reference at T 64
reaches 99.0 / 99.6% (4 / 8 pairs) at lr 3e-3 after 1,000 of 2,000 steps (86 s of training);
with a 1,000-step schedule it stays at 49 / 29% (the cosine has decayed the lr before the
association is found), and lr 1e-3 or 1e-2 stay at the copy plateau. A configuration that
never reaches the target costs 2,000 steps: 150-210 s of training at T 64 (Transformer), plus
~25 s of worker start and evaluations.

Seeds: ``--seeds K ...`` (default ``--seed``) runs every (model, length, lr) once per seed
(its initialisation and its data streams). One run cannot tell a model that recalls from a
lucky one, so with more than one seed or lr the report adds a **recall rate** per (model,
length): the runs whose every pair count reaches ``--solved-accuracy`` (0.9) test accuracy,
over the finished runs, with a Wilson 95% interval, the test accuracy's mean and sample std,
and the solved runs per lr. The best-lr tables are then per seed.

Models: any registry name, with per-model config overrides as ``NAME:KEY=VALUE,...``
(``transformer:init=gpt2,tie_embeddings=false``) and overrides for every registry model by
``--model-arg KEY=VALUE``; the library's defaults otherwise (``init``, ``tie_embeddings``,
position embeddings: whatever ``LMConfig`` says at run time; GAM d_model memory slots, Mamba
d_state 16, 4 heads), and ``textbook-transformer``, a reference built from ``torch.nn`` parts
(``gam.bench.textbook_transformer``: ``nn.TransformerEncoder`` pre-LN, N(0, 1) token and
position embeddings, untied head) which tells a failure of a model from a failure of the
protocol.

Engineering: every (model, length, lr, seed) configuration trains in a fresh
``python -m gam.bench.recall --worker`` process (``run_worker``); its record is written
to ``OUT/configs/<id>.json`` (``config_id``: ``MODEL-T<length>-lr<lr>[-seed<k>]``, no suffix for
seed 0) as soon as it finishes (its progress to ``<id>.log``), and
``results.json`` / ``results.md`` / ``recall.png`` are rewritten atomically after every
configuration. Rerunning the same command with the same ``--out`` reuses every finished
configuration whose settings match (``action: reused``) and trains the others; one that was
interrupted continues from its last validation (``<id>.ckpt``, removed once it finishes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gam.bench import common
from gam.bench.environment import command_line, environment
from gam.bench.protocols import seeds_of
from gam.bench.recall_protocol import (
    DEFAULT_LRS,
    DEFAULT_PAIRS,
    DEFAULT_SEQ_LENS,
    MAX_PAIR_FRACTION,
    PRESETS,
    QUICK_LRS,
    QUICK_PAIRS,
    QUICK_SEQ_LENS,
    TEXTBOOK,
    Protocol,
    default_models,
    init_label,
    mix_for_length,
    pairs_for_length,
    parse_mix_case,
    parse_variant,
    protocol_key,
    recall_config,
)
from gam.bench.recall_report import write_results
from gam.bench.recall_training import train_config
from gam.bench.tasks import (
    Configuration,
    add_protocol_options,
    add_rerun_options,
    check_distinct,
    check_rerun_options,
    progress_log,
    protocol_overrides,
    resolve_preset,
)
from gam.bench.workers import emit, run_in_process, worker_main
from gam.runtime import resolve_device
from gam.training.argtypes import parse_model_arg, positive_int, positive_number, seed


def _worker(payload: dict[str, Any], emit=emit) -> None:
    t0 = time.perf_counter()
    checkpoint = payload.get("checkpoint")
    result = train_config(payload["name"], payload["overrides"], payload["seq_len"],
                          payload["pairs"], payload["lr"], Protocol(**payload["protocol"]),
                          payload["seed"], torch.device(payload["device"]),
                          log=progress_log(payload),
                          checkpoint=Path(checkpoint) if checkpoint else None,
                          key=payload.get("key"), mix=payload.get("mix", []))
    if checkpoint:
        Path(checkpoint).unlink(missing_ok=True)
    emit({**result, "wall_seconds": time.perf_counter() - t0})


# ------------------------------------------------------------------------------ command
OPTION_HELP = {  # the protocol's options, each overriding the preset's (--quick's) field
    "d_model": "width of every model (default 64; quick 32)",
    "n_layers": "layers of every model (default: 2)",
    "vocab_size": "keys from [1, V/2), values from [V/2, V) (default: 128)",
    "steps": "optimizer steps per configuration (default 2000; quick 30)",
    "tokens_per_step": "batch size = tokens-per-step / T, split evenly between the pair counts "
                       "(default 2048; quick 256)",
    "warmup_fraction": "linear warm-up over this fraction of the steps, then cosine to 0 "
                       "(default: 0.1)",
    "weight_decay": "AdamW weight decay on matrices (nanogpt filter) (default: 0.1)",
    "eval_every": "steps between validation scores (default 100; quick 15)",
    "target_accuracy": "stop a configuration once every pair count reaches this validation "
                       "accuracy (default: 0.99)",
    "val_examples": "validation sequences per pair count (default 256; quick 32)",
    "test_examples": "test sequences per pair count (default 1000; quick 64)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME[:K=V,...]",
                        help=f"registry names or {TEXTBOOK}, each optionally with config "
                             f"overrides, e.g. transformer:init=gpt2,tie_embeddings=false "
                             f"(default: {' '.join(default_models())})")
    parser.add_argument("--model-arg", action="append", type=parse_model_arg, default=[],
                        metavar="KEY=VALUE",
                        help="config override for every registry model (repeatable; not "
                             f"applied to {TEXTBOOK}), e.g. init=gpt2 (default: none)")
    parser.add_argument("--seq-lens", nargs="+", type=positive_int, default=None, metavar="T",
                        help="sequence lengths, one model per length (default 64 128 256; "
                             "quick 32)")
    parser.add_argument("--num-kv-pairs", nargs="+", type=positive_int, default=None, metavar="P",
                        help="pair counts; each length trains on those with 8P <= T "
                             "(default 4 8 16; quick 2 4)")
    parser.add_argument("--lrs", nargs="+", type=positive_number, default=None, metavar="LR",
                        help="peak learning rates swept per (model, length); the best "
                             "validation accuracy is reported (default 1e-3 3e-3 1e-2; quick "
                             "3e-3 1e-2)")
    parser.add_argument("--seeds", nargs="+", type=seed, default=None, metavar="K",
                        help="seeds, each the initialisation and data seed of every "
                             "(model, length, lr); with more than one seed or lr the report "
                             "adds the rate of solved runs (default: --seed)")
    parser.add_argument("--solved-accuracy", type=float, default=0.9, metavar="A",
                        help="a run counts as solved when every pair count's test accuracy "
                             "is >= A; reported only, not part of a configuration "
                             "(default: 0.9)")
    add_protocol_options(parser, Protocol, OPTION_HELP, flags={"test_examples": "--eval-examples"})
    parser.add_argument("--zero-filler", action="store_true",
                        help="fill non-query positions with 0 instead of zoology's random "
                             "tokens (default: random tokens)")
    parser.add_argument("--power-a", type=float, default=None, metavar="A",
                        help="place the queries with zoology's power law, p(slot i) ~ "
                             "(i+1)^(A-1) (zoology's MQAR uses A = 0.01: most queries soon "
                             "after the pairs) (default: uniform slots)")
    parser.add_argument("--mix", nargs="*", type=parse_mix_case, default=None,
                        metavar="T:P",
                        help="shorter cases trained beside every longer length, each step "
                             "tokens-per-step / 2 tokens per mixed length (zoology's original "
                             "MQAR set mixes 64 to 256 this way); --mix alone: every length "
                             "alone, as zoology's Figure 2 (default 64:4; quick none)")
    parser.add_argument("--max-seconds", type=positive_number, default=None,
                        help="training-time limit of one configuration: it then stops, is "
                             "evaluated and recorded with stop 'time limit' (default: none)")
    parser.add_argument("--in-process", action="store_true",
                        help="train every configuration in this process instead of one fresh "
                             "worker process each: starts faster (smoke tests), but a crash "
                             "ends the run (default: one process per configuration)")
    add_rerun_options(parser, "OUT/configs")


def resolve_protocol(args: argparse.Namespace) -> Protocol:
    p = resolve_preset(PRESETS, "quick" if args.quick else "default", {
        **protocol_overrides(args, OPTION_HELP), "random_filler": not args.zero_filler,
        "max_seconds": args.max_seconds, "query_power_a": args.power_a,
        "mix": None if args.mix is None else tuple(sorted(set(args.mix)))},
        at_least_one=("vocab_size", "d_model", "n_layers", "steps", "tokens_per_step",
                      "eval_every", "val_examples", "test_examples"))
    if not 0.0 <= p.warmup_fraction < 1.0:
        raise ValueError(f"--warmup-fraction must be in [0, 1), got {p.warmup_fraction}")
    if any(q > p.vocab_size // 2 - 1 for _, q in p.mix):
        raise ValueError(f"--mix {[f'{t}:{q}' for t, q in p.mix]}: vocab_size {p.vocab_size} "
                         f"has only {p.vocab_size // 2 - 1} keys")
    if p.query_power_a is not None and not 0.0 < p.query_power_a <= 1.0:
        raise ValueError(f"--power-a must be in (0, 1] (1 is uniform), got {p.query_power_a}")
    return p


def config_id(label: str, seq_len: int, lr: float, run_seed: int) -> str:
    """The file name of a configuration in ``OUT/configs``: seed 0 has no seed suffix, the name
    it had before there were several seeds, so that its finished results stay reused."""
    suffix = f"-seed{run_seed}" if run_seed else ""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{label}-T{seq_len}-lr{lr:g}{suffix}")


def move_other_seed_records(configs: Path) -> list[Path]:
    """Before there were several seeds, ``--seed K`` wrote its record (and its checkpoint and
    log) under the seed-0 name ``config_id(..., 0)``: move each such record to its own name
    ``...-seedK`` before anything trains, so that seed 0 cannot overwrite it and seed K finds
    it. A record already at its own name is left; returns the records moved."""
    moved = []
    for path in sorted(configs.glob("*.json")) if configs.is_dir() else []:
        try:
            seed = json.loads(path.read_text()).get("key", {}).get("seed", 0)
        except (OSError, ValueError, AttributeError):
            continue  # not a record of ours, or a damaged one: the run redoes it
        if not isinstance(seed, int) or seed == 0 or path.stem.endswith(f"-seed{seed}"):
            continue
        target = path.with_name(f"{path.stem}-seed{seed}.json")
        if target.exists():
            continue
        for ext in (".ckpt", ".log"):
            if path.with_suffix(ext).exists():
                path.with_suffix(ext).replace(target.with_suffix(ext))
        path.replace(target)
        moved.append(target)
    return moved


def _print_row(row: dict[str, Any], show_seed: bool) -> None:
    head = f"  {row['model']} T {row['seq_len']} lr {row['lr']:g}" + (
        f" seed {row['seed']}" if show_seed else "")
    if row["status"] == "ok":
        accs = ", ".join(f"P{q} {100 * r['accuracy']:.1f}%" for q, r in row["pairs"].items())
        print(f"{head}: {accs} (validation {100 * row['val_accuracy']:.1f}%), {row['steps']} "
              f"steps ({row['stop_reason']}), {row['train_seconds']:.0f} s training, "
              f"{row['action']}", flush=True)
    else:
        error = f": {row['error']}" if row.get("error") else ""
        print(f"{head}: {row['status']}{error}", flush=True)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    threads = common.setup_threads(args.threads)
    check_rerun_options(args)
    p = resolve_protocol(args)
    seq_lens = sorted(set(args.seq_lens or (QUICK_SEQ_LENS if args.quick else DEFAULT_SEQ_LENS)))
    all_pairs = sorted(set(args.num_kv_pairs or (QUICK_PAIRS if args.quick else DEFAULT_PAIRS)))
    lrs = list(dict.fromkeys(args.lrs or (QUICK_LRS if args.quick else DEFAULT_LRS)))
    global_args = dict(args.model_arg)
    variants: list[tuple[str, str, dict[str, Any]]] = []  # (label, name, overrides)
    for text in args.models or default_models():
        name, own = parse_variant(text)
        overrides = own if name == TEXTBOOK else {**global_args, **own}
        variants.append((text, name, overrides))
    labels = [v[0] for v in variants]
    check_distinct(labels)
    lengths = {t: pairs_for_length(t, all_pairs, p.vocab_size) for t in seq_lens}
    if not any(lengths.values()):
        raise SystemExit(f"gam bench recall: no pair count with {MAX_PAIR_FRACTION} x pairs <= "
                         f"length among {all_pairs} for lengths {seq_lens}")
    seeds = seeds_of(args)
    if not 0.0 <= args.solved_accuracy <= 1.0:
        raise ValueError(f"--solved-accuracy must be in [0, 1], got {args.solved_accuracy}")
    out = Path(args.out)
    command = command_line(args.command, args.argv)
    settings = {"models": labels, "model_args": global_args, "seq_lens": seq_lens,
                "pairs": all_pairs, "pairs_by_length": {str(t): v for t, v in lengths.items()},
                "lrs": lrs, "protocol": asdict(p), "seeds": seeds,
                "solved_accuracy": args.solved_accuracy, "device": str(device),
                "threads": threads,
                "optimizer": "gam.training.optim AdamW betas (0.9, 0.95), nanogpt decay filter, "
                             "warm-up then cosine to 0, clip 1.0",
                "task": "MQAR (zoology): P key-value pairs, then every key queried once at a "
                        "random even offset of the rest; accuracy on query positions only"}
    results: dict[str, Any] = {"command": command, "settings": settings, "configs": [],
                               "runs": [], "environment": environment(device, threads)}
    n_configs = sum(len(lrs) * len(seeds) for t in seq_lens if lengths[t] for _ in variants)
    print(f"gam bench recall: models {labels}, lengths {seq_lens}, lrs {lrs}, seeds {seeds}, "
          f"d {p.d_model}, {p.n_layers} layers, vocab {p.vocab_size}, {p.steps} steps of "
          f"{p.tokens_per_step} tokens, {n_configs} configurations, device {device}, "
          f"{threads} threads", flush=True)
    for moved in move_other_seed_records(out / "configs"):
        print(f"  moved a record of the seed it holds to {moved.name}", flush=True)
    # length-major, then seed-major: an interrupted benchmark still has every model at the
    # first length and seed
    for t in seq_lens:
        pairs = lengths[t]
        if not pairs:
            continue
        for run_seed in seeds:
            for label, name, overrides in variants:
                reason = common.model_available(name) if name != TEXTBOOK else None
                init, tied, resolved = "-", "-", None
                if reason is None:
                    try:
                        config = recall_config(name, overrides, t, p)
                    except (TypeError, ValueError) as exc:  # a bad override: fail now
                        raise ValueError(f"model {label!r}: {exc}") from None
                    init, tied = init_label(name, config)
                    resolved = asdict(config)  # init and tying resolved: part of the key
                mix = mix_for_length(t, p)
                for lr in lrs:
                    key = {"protocol": protocol_key(p), "model": label, "name": name,
                           "overrides": overrides, "model_config": resolved, "seq_len": t,
                           "pairs": pairs, "lr": lr, "seed": run_seed, "device": device.type}
                    if mix:  # absent without a mixture: the keys of older runs stay valid
                        key["mix"] = mix
                    row: dict[str, Any] = {"model": label, "name": name,
                                           "overrides": overrides, "init": init, "tied": tied,
                                           "seq_len": t, "pairs_trained": pairs, "mix": mix,
                                           "lr": lr, "seed": run_seed}
                    config = Configuration(
                        out / "configs" / f"{config_id(label, t, lr, run_seed)}.json", key)
                    old = None if args.retrain else config.finished()
                    if old is not None:
                        row.update({k: v for k, v in old.items() if k != "key"},
                                   action="reused")
                    elif reason is not None:
                        row.update(status="unavailable", error=reason, action="skipped")
                    elif args.report_only:
                        row.update(status="not run", action="skipped")
                    else:
                        payload = {"name": name, "overrides": overrides, "seq_len": t,
                                   "pairs": pairs, "lr": lr, "protocol": asdict(p),
                                   "seed": run_seed, "device": str(device),
                                   "threads": threads, "key": key, "mix": mix}
                        limit = None if p.max_seconds is None else 2 * p.max_seconds + 600
                        row.update(config.run(
                            "gam.bench.recall", payload, timeout=limit, resumable=True,
                            retrain=args.retrain,
                            in_process=partial(run_in_process, _worker) if args.in_process
                            else None))
                    results["configs"].append(row)
                    _print_row(row, len(seeds) > 1)
                    write_results(out, results)
    write_results(out, results, plot=True)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'recall.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(_worker))
