"""``gam bench long``: language modelling at long contexts -- where a linear-cost model should
pay off.

Every family of ``--models`` (default: each of gam, gam-delta, transformer, transformer-pp,
mamba, gated-deltanet, rwkv7, s4d that is registered when the command runs) is trained at one
small size shared by all (protocol ``long``: preset cpu-small with d_model 128, 4 layers) on
each corpus of ``--datasets`` (default austen, wikitext2, python-stdlib) at each context
``T`` of ``--contexts`` (default 1024 and 4096; the model's ``max_seq_len`` is set to T), with
the same number of tokens per optimizer step (``--tokens-per-step``: the batch is that / T) and
the same number of steps, so every configuration sees the same token budget, of the corpus
alone.

**Passkey retrieval** is a second kind of run, one per family (``--parts``: ``lm``,
``passkey`` or both): the family trained at ``--passkey-context`` (default 1024) on
``--passkey-dataset`` with a share ``--passkey-mix`` (default 0.9) of its blocks replaced by
packed passkey samples (:mod:`gam.data.passkey`), for ``--passkey-steps`` steps (default
2,000) of ``--passkey-batch`` blocks (default 4) -- the copy needs many samples and steps,
which a language-modelling budget does not give a small model.

Each configuration is one training run (``OUT/runs/<dataset>/<family>-T<T>-seed<k>``, or
``<family>-passkey-T<T>-seed<k>``, trained, resumed or reused as in ``gam bench compare``, locked
against a second process), then one evaluation in a fresh worker process
(``OUT/evals/<dataset>/<label>-seed<k>.json``, kept and reused, locked likewise), which
measures on a language-modelling run:

- **loss by position**: the validation split cut into windows of T (as the run's own
  evaluation), the loss of each target summed by its position in the window, reported per
  bucket of positions 1-4, 5-16, 17-64, 65-256, 257-1,024, 1,025-4,096, 4,097-16,384 (a
  target at position p is predicted from p tokens); the buckets' token-weighted mean is the
  validation loss; with the standard error across windows, the drop from each bucket to the
  next paired within windows, and the context used (the farthest bucket that still helps by
  more than 2.5 standard errors: ``long_measure.context_used``);
- **context gains**: the same targets (those more than 2k tokens into their window) with
  only their last k+1..2k tokens, for k in 16, 64, 256, 1,024 (2k < T): how much the loss
  rises without the tokens further back, paired per target, ± its standard error across
  windows -- the sharper test of whether a family uses tokens k back (the buckets compare
  different tokens);
- **speed and memory at T**: training tokens/s of the run itself (its whole training), the
  median time and the peak memory growth of ``--measure-steps`` training steps at (batch, T)
  (``gam.bench.throughput.time_steps``, ``MemoryMeter``), and the decode tokens/s of greedy
  cached steps at the end of a context of T tokens;

and on a passkey run:

- **passkey retrieval**: accuracy of greedy decoding by context length (``--passkey-lengths``
  times T, beyond T only for a family without learned positions: the others have no position
  past T) and by depth of the key (``--passkey-depths``), ``--passkey-samples`` prompts per
  cell, scored on the digits only.

Writes ``results.json`` (``runs``: one row per configuration with its evaluation), ``results.md``
and ``positions-<dataset>.png`` (loss by position bucket, every family and T on one figure).
``--report-only`` trains and evaluates nothing; ``--quick`` is a seconds-long smoke version.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gam.bench import training_bench as tb
from gam.bench.environment import command_line, environment
from gam.bench.long_measure import (
    POSITION_EDGES,
    context_gains,
    decode_speed,
    passkey_accuracy,
    position_buckets,
    training_speed,
    truncated_losses,
)
from gam.bench.long_records import record_of, save_record
from gam.bench.long_report import build_markdown, plot_gains, plot_positions
from gam.bench.protocols import Protocol, seeds_of
from gam.bench.reports import write_results
from gam.bench.runs import RunSpec, apply_model_args, check_models
from gam.bench.tasks import Configuration, check_distinct
from gam.bench.workers import emit, worker_main
from gam.models.registry import MODELS
from gam.training.argtypes import parse_model_arg
from gam.training.evaluate import evaluate_by_position
from gam.training.options import add_override_arguments, overridable_keys
from gam.training.run import load_run, run_split_ids
from gam.training.rundir import dataset_slug, read_run_config

MAIN_FAMILIES = ("gam", "gam-delta", "transformer", "transformer-pp", "mamba",
                 "gated-deltanet", "rwkv7", "s4d")
DEFAULT_DATASETS = ["austen", "wikitext2", "python-stdlib"]
DEFAULT_CONTEXTS = [1024, 4096]
QUICK_CONTEXTS = [128]
PARTS = ("lm", "passkey")
PASSKEY_CONTEXT = 1024  # the budget that taught transformer-pp the copy (docs/results.md)
PASSKEY_BATCH = 4
PASSKEY_STEPS = 2000
PASSKEY_MIX = 0.9
PASSKEY_DATASET = "wikitext2"
PASSKEY_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
PASSKEY_LENGTHS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]
GENERATED_TOKENS = 8  # greedy tokens after the question: the answer " 12345." and slack
EVAL_FORMAT = 3  # bump when the evaluation changes, so that kept evaluations are redone
LM_EVAL_FORMAT = 3  # bump when only the language-modelling runs' evaluation changes
# the contexts k the loss is also measured with (the last k+1..2k tokens only; long_measure)
TRUNCATIONS = (16, 64, 256, 1024)
# the evaluation settings of the passkey runs (the others are the language-modelling runs')
PASSKEY_EVALUATION = {"passkey_lengths", "passkey_depths", "passkey_samples", "generated_tokens"}
# not overridable here: the block length and batch come from --contexts and --tokens-per-step,
# validation runs at the end of each run only, and the passkey share is that of the passkey
# runs (--passkey-mix; language-modelling runs train on their corpus alone)
OVERRIDES = overridable_keys(exclude={"batch_size", "seq_len", "eval_every", "passkey_mix"})

PROTOCOLS = {
    "long": Protocol(
        "long",
        "one small size for every family: preset cpu-small with d_model 128 (4 layers, 4 heads, "
        "256 slots), byte-level BPE of 10,000 tokens trained on the train split, AdamW lr 1e-3 "
        "(15 warm-up steps, cosine over the budget), bf16 autocast, 150 optimizer steps of "
        "--tokens-per-step tokens at every T (1,228,800 tokens with the default 8,192) of the "
        "corpus alone, validation on the whole valid split; passkey runs: the same with "
        "--passkey-batch blocks of --passkey-context tokens per step, --passkey-steps steps and "
        "a share --passkey-mix of the blocks packed with passkey samples",
        dict(model_preset="cpu-small", model_arg={"d_model": 128}, vocab_size=10000,
             tokenizer_kind="bytelevel", tokenizer_on_all_splits=False, epochs=1, max_steps=150,
             lr=1e-3, warmup_steps=15, dtype="bf16", max_train_rows=None, max_val_rows=None,
             eval_every=None, log_every=10, save_every=25, gate_stat_batches=0,
             passkey_mix=0.0)),
    "quick": Protocol(
        "long-quick",
        "smoke test: preset tiny, byte-level BPE of 512 tokens, 4 steps, first 400 train / 40 "
        "validation rows (numbers mean nothing)",
        dict(model_preset="tiny", vocab_size=512, tokenizer_kind="bytelevel",
             tokenizer_on_all_splits=False, epochs=1, max_steps=4, lr=3e-3, warmup_steps=1,
             dtype="fp32", max_train_rows=400, max_val_rows=40, eval_every=None, log_every=2,
             save_every=2, gate_stat_batches=0, passkey_mix=0.0)),
}


def default_families() -> list[str]:
    """The main families registered here, in :data:`MAIN_FAMILIES` order (a family added to
    the registry under one of those names joins by name)."""
    return [name for name in MAIN_FAMILIES if name in MODELS]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Long-context language modelling: every family trained at context T on each corpus with "
        "the same token budget; validation perplexity, loss by position in the window, passkey "
        "retrieval by length and depth, training and decode speed and peak memory at T. "
        "Resumable (finished runs and evaluations are reused, unfinished runs resumed).")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help=f"build_model names (default: those of {', '.join(MAIN_FAMILIES)} "
                             f"registered here)")
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, metavar="NAME",
                        help="corpora (austen, wikitext2, python-stdlib, text:PATH, ...)")
    parser.add_argument("--contexts", nargs="+", type=int, default=None, metavar="T",
                        help=f"training contexts (default {DEFAULT_CONTEXTS}; quick "
                             f"{QUICK_CONTEXTS})")
    parser.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                        help="tokens per optimizer step at every T; the batch is N / T (default "
                             "8192; quick 512)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="lm: the language-modelling runs of every corpus and T; passkey: "
                             "the passkey runs (default: lm passkey)")
    g = parser.add_argument_group("passkey runs")
    g.add_argument("--passkey-context", type=int, default=None, metavar="T",
                   help=f"their context (default {PASSKEY_CONTEXT}; quick 128)")
    g.add_argument("--passkey-batch", type=int, default=None, metavar="N",
                   help=f"their blocks per optimizer step (default {PASSKEY_BATCH}; quick 1)")
    g.add_argument("--passkey-steps", type=int, default=None, metavar="N",
                   help=f"their optimizer steps (default {PASSKEY_STEPS}; quick 4)")
    g.add_argument("--passkey-mix", type=float, default=PASSKEY_MIX, metavar="X",
                   help=f"share of their blocks packed with passkey samples, the rest from "
                        f"the corpus (default {PASSKEY_MIX})")
    g.add_argument("--passkey-dataset", default=None, metavar="NAME",
                   help=f"the corpus of the rest (default {PASSKEY_DATASET}; quick: the first "
                        f"of --datasets)")
    g = parser.add_argument_group("protocol (identical for every configuration)")
    g.add_argument("--seeds", type=int, nargs="+", default=argparse.SUPPRESS, metavar="K",
                   help="seeds (init and data order) of every configuration (default: --seed)")
    add_override_arguments(g, OVERRIDES)
    g.add_argument("--model-arg", action="append", type=parse_model_arg, default=[],
                   metavar="KEY=VALUE", dest="model_args",
                   help="a model config field for every model, repeatable (max_seq_len is T)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--passkey-lengths", nargs="+", type=float, default=PASSKEY_LENGTHS,
                   metavar="X", help="passkey context lengths, as multiples of T")
    g.add_argument("--passkey-depths", nargs="+", type=float, default=PASSKEY_DEPTHS,
                   metavar="D", help="depths of the key in the context (0 first, 1 last)")
    g.add_argument("--passkey-samples", type=int, default=None, metavar="N",
                   help="prompts per (length, depth) cell (default 5; quick 2)")
    g.add_argument("--measure-steps", type=int, default=None, metavar="N",
                   help="timed training steps at T (default 3; quick 1)")
    g.add_argument("--decode-tokens", type=int, default=None, metavar="N",
                   help="timed decode steps after a T-token context (default 32; quick 4)")
    g.add_argument("--max-seconds", type=float, default=3600.0,
                   help="wall-clock limit of one evaluation worker")
    g = parser.add_argument_group("data and output")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with the corpora (default: $GAM_DATA_DIR, else the hub)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="tokenizer / token-id cache (default: $GAM_CACHE_DIR or ~/.cache/gam)")
    g.add_argument("--quiet", action="store_true", help="no per-step training log")
    g.add_argument("--records", default=None, metavar="DIR",
                   help="where each finished configuration's row (training and evaluation) "
                        "is kept as JSON and read back when its settings and data match, "
                        "run folder or not (default OUT/records): a grid that outlives its "
                        "run folders, e.g. across machines")
    g.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: report what is finished in --out and "
                        "--records")


# ------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """What the command line resolves to."""

    protocol: Protocol
    families: list[str]
    contexts: list[int]
    tokens_per_step: int
    evaluation: dict[str, Any]
    parts: list[str]
    passkey: dict[str, Any]  # context, steps, batch, mix, dataset of the passkey runs

    def protocol_at(self, seq_len: int) -> Protocol:
        """The protocol at context ``seq_len``: batch = tokens per step / T."""
        return Protocol(self.protocol.name, self.protocol.description,
                        {**self.protocol.settings, "seq_len": seq_len,
                         "batch_size": self.tokens_per_step // seq_len})

    def passkey_protocol(self) -> Protocol:
        """The passkey runs' protocol: ``batch`` blocks of the passkey context per step, for the
        steps asked however many epochs they take (a corpus of ~2.6M tokens has ~640 blocks
        of 4,096: a replaced block's samples come back each epoch, their key too)."""
        p = self.passkey
        return Protocol(f"{self.protocol.name}-passkey", self.protocol.description,
                        {**self.protocol.settings, "seq_len": p["context"],
                         "batch_size": p["batch"],
                         "epochs": 10**6, "max_steps": p["steps"], "passkey_mix": p["mix"]})


def resolve_settings(args: argparse.Namespace) -> Settings:
    """ValueError for settings that cannot run."""
    base = PROTOCOLS["quick" if args.quick else "long"]
    changes = {k: getattr(args, k) for k in OVERRIDES if hasattr(args, k)}
    protocol = base.override(**changes) if changes else base
    families = list(args.models) if args.models else default_families()
    check_distinct(families)
    contexts = sorted(set(args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS)))

    def given(value: int | None, quick: int, default: int) -> int:
        return value if value is not None else (quick if args.quick else default)

    counts = {"--tokens-per-step": args.tokens_per_step, "--passkey-context":
              args.passkey_context, "--passkey-steps": args.passkey_steps,
              "--passkey-batch": args.passkey_batch,
              "--passkey-samples": args.passkey_samples, "--measure-steps": args.measure_steps,
              "--decode-tokens": args.decode_tokens}
    bad = {flag: v for flag, v in counts.items() if v is not None and v < 1}
    if bad:
        raise ValueError(", ".join(f"{flag} must be positive, got {v}" for flag, v in bad.items()))
    tokens = given(args.tokens_per_step, 512, 8192)
    bad = [t for t in contexts if t < 1 or tokens % t]
    if bad:
        raise ValueError(f"--contexts {bad}: each T must divide --tokens-per-step {tokens} "
                         f"(the batch is tokens per step / T)")
    if any(not 0 <= d <= 1 for d in args.passkey_depths):
        raise ValueError(f"--passkey-depths must be in [0, 1], got {args.passkey_depths}")
    if any(x <= 0 for x in args.passkey_lengths):
        raise ValueError(f"--passkey-lengths must be positive, got {args.passkey_lengths}")
    passkey = {"context": given(args.passkey_context, 128, PASSKEY_CONTEXT),
               "steps": given(args.passkey_steps, 4, PASSKEY_STEPS),
               "batch": given(args.passkey_batch, 1, PASSKEY_BATCH),
               "mix": args.passkey_mix,
               "dataset": args.passkey_dataset or (args.datasets[0] if args.quick
                                                   else PASSKEY_DATASET)}
    evaluation = {
        "format": EVAL_FORMAT, "lm_format": LM_EVAL_FORMAT, "edges": list(POSITION_EDGES),
        "truncations": list(TRUNCATIONS),
        "passkey_lengths": sorted(set(args.passkey_lengths)),
        "passkey_depths": sorted(set(args.passkey_depths)),
        "passkey_samples": given(args.passkey_samples, 2, 5),
        "generated_tokens": GENERATED_TOKENS,
        "measure_steps": given(args.measure_steps, 1, 3),
        "decode_tokens": given(args.decode_tokens, 4, 32),
    }
    settings = Settings(protocol, families, contexts, tokens, evaluation, list(args.parts),
                        passkey)
    for seq_len in contexts:  # a bad setting (e.g. --lr -1) fails here, not per run
        settings.protocol_at(seq_len).run_config("gam", "austen", 0, {}, None)
    settings.passkey_protocol().run_config("gam", "austen", 0, {}, None)  # --passkey-mix 2
    return settings


# ---------------------------------------------------------------------------------- worker
def _worker(payload: dict[str, Any]) -> None:
    device = torch.device(payload["device"])
    run_dir, seq_len, evaluation = payload["run_dir"], payload["seq_len"], payload["evaluation"]
    model, tokenizer, config = load_run(run_dir, map_location=device)
    if payload["part"] == "passkey":
        t0 = time.perf_counter()
        cells = passkey_accuracy(model, config["model"], tokenizer, seq_len, evaluation,
                                 payload["seed"], device)
        emit({"status": "ok", "passkey": cells, "passkey_s": time.perf_counter() - t0})
        return
    ids = run_split_ids(run_dir, config, tokenizer, "valid", payload.get("data_dir"),
                        cache_dir=payload.get("cache_dir"))
    t0 = time.perf_counter()
    positions = evaluate_by_position(model, ids, seq_len, batch_size=payload["batch_size"],
                                     dtype=payload["dtype"], device=device, keep_blocks=True)
    record: dict[str, Any] = {
        "status": "ok", "position_loss": positions["loss"], "position_tokens": positions["tokens"],
        "buckets": position_buckets(positions["position_loss_sum"],
                                    positions["position_tokens"], evaluation["edges"],
                                    positions["block_losses"]),
        "position_eval_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    truncated = {k: truncated_losses(model, ids, seq_len, k, payload["batch_size"],
                                     payload["dtype"], device)
                 for k in evaluation["truncations"] if 2 * k < seq_len}
    record["context_gains"] = context_gains(positions["block_losses"], truncated)
    record["truncation_eval_s"] = time.perf_counter() - t0
    model.eval()
    context = torch.from_numpy(np.resize(np.asarray(ids, dtype=np.int64),
                                         seq_len - evaluation["decode_tokens"] - 1))[None]
    record.update(decode_speed(model, context, evaluation["decode_tokens"], device))
    record.update(training_speed(model, ids, seq_len, payload["batch_size"], payload["dtype"],
                                 evaluation["measure_steps"], device))
    emit(record)


# ------------------------------------------------------------------------------ evaluation
def part_evaluation(settings: Settings, part: str) -> dict[str, Any]:
    """The evaluation settings a configuration of ``part`` depends on (and the format): a
    change to the other part's settings keeps its evaluation."""
    return {k: v for k, v in settings.evaluation.items()
            if k == "format" or (k in PASSKEY_EVALUATION) == (part == "passkey")}


def eval_path(out: Path, spec: RunSpec) -> Path:
    return out / "evals" / dataset_slug(spec.dataset) / f"{spec.label}-seed{spec.seed}.json"


def evaluate_configuration(bench: tb.Benchmark, spec: RunSpec, row: dict[str, Any],
                           settings: Settings, seq_len: int) -> dict[str, Any]:
    """The evaluation of a finished run (its part: ``spec.extra["part"]``): kept from an
    earlier call when made with the same settings on the same run, else measured in a worker
    (``--report-only``: never)."""
    run_config = read_run_config(row["run_dir"])
    part = spec.extra["part"]
    key = {**part_evaluation(settings, part), "part": part,
           "run_created": run_config.get("created"), "run_steps": row.get("steps")}
    config = Configuration(eval_path(bench.out, spec), key, nested=True, logged=False)
    kept = config.finished()
    if kept is not None:
        return {**kept, "eval_action": "reused"}
    if bench.report_only:
        return {"eval_status": "not run", "eval_error": "no evaluation of this run yet "
                "(--report-only evaluates nothing)"}
    payload = {"run_dir": row["run_dir"], "seq_len": seq_len, "evaluation": settings.evaluation,
               "part": part, "device": str(bench.device), "threads": bench.args.threads,
               "batch_size": max(1, settings.tokens_per_step // seq_len),
               "dtype": settings.protocol.dtype, "seed": spec.seed,
               "data_dir": bench.data_dirs.get(spec.dataset), "cache_dir": bench.cache_dir}
    bench.log(f"[{spec.label} on {spec.dataset}] evaluating "
              f"({'passkey' if part == 'passkey' else 'positions, speed'})")
    result = config.run("gam.bench.long", payload, timeout=bench.args.max_seconds,
                        record=False)
    if result.pop("action") == "skipped":  # another process evaluates it
        return {"eval_status": "not run", "eval_error": result["error"]}
    result.pop("wall_seconds")
    status = result.pop("status", "error")
    result = {**result, "eval_status": status, "eval_threads": bench.threads,
              "eval_device": str(bench.device)}
    if status == "ok":
        config.save(result)
    else:
        result["eval_error"] = result.pop("error", None)
    return {**result, "eval_action": "evaluated"}


# ------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    try:
        settings = resolve_settings(args)
        bench = tb.Benchmark(args, "long", settings.protocol)
        seeds = seeds_of(args)
        pk = settings.passkey
        specs = [(RunSpec(dataset=d, model=f, seed=k, label=f"{f}-T{t}",
                          overrides={"max_seq_len": t}, extra={"family": f, "T": t, "part": "lm"}),
                  settings.protocol_at(t))
                 for d in args.datasets for t in settings.contexts for k in seeds
                 for f in settings.families if "lm" in settings.parts]
        specs += [(RunSpec(dataset=pk["dataset"], model=f, seed=k,
                           label=f"{f}-passkey-T{pk['context']}",
                           overrides={"max_seq_len": pk["context"]},
                           extra={"family": f, "T": pk["context"], "part": "passkey"}),
                   settings.passkey_protocol())
                  for k in seeds for f in settings.families if "passkey" in settings.parts]
        apply_model_args([s for s, _ in specs], args)
        for protocol in {id(p): p for _, p in specs}.values():
            check_models([s for s, p in specs if p is protocol], protocol)
    except ValueError as exc:
        print(f"gam bench long: error: {exc}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)
    started = time.perf_counter()

    def results() -> dict[str, Any]:
        return {"protocol": settings.protocol.to_dict(), "seeds": seeds,
                "settings": {"families": settings.families, "contexts": settings.contexts,
                             "parts": settings.parts, "passkey": settings.passkey,
                             "tokens_per_step": settings.tokens_per_step,
                             "evaluation": settings.evaluation},
                "datasets_requested": list(args.datasets), "datasets": bench.datasets,
                "runs": bench.rows, "total_wall_s": time.perf_counter() - started,
                "environment": environment(bench.device, bench.threads),
                "command": command_line("long", getattr(args, "argv", []))}

    def write() -> None:
        res = results()
        write_results(out, res, build_markdown(res))

    records = Path(args.records) if args.records else out / "records"
    eval_ok = True
    for spec, protocol in specs:
        record = record_of(bench, records, spec, protocol,
                           part_evaluation(settings, spec.extra["part"]))
        kept = record.finished() if record is not None else None
        if kept is not None:
            bench.rows.append({**kept, "action": "recorded", "eval_action": "recorded"})
            bench.log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] using its record "
                      f"{record.path}")
            write()
            continue
        row = bench.run(spec, protocol=protocol)
        if row.get("status") == "ok":
            row.update(evaluate_configuration(bench, spec, row, settings, protocol.seq_len))
            eval_ok &= row.get("eval_status") == "ok" or (
                bench.report_only and row.get("eval_status") == "not run")
            if (record is not None and row.get("eval_status") == "ok"
                    and not bench.report_only):
                save_record(bench, record, row, out)
        write()
    res = results()
    plots = [lambda o, d=d, plot=plot, name=name: plot(bench.rows, d,
                                                       o / f"{name}-{dataset_slug(d)}.png")
             for d in args.datasets
             for plot, name in ((plot_positions, "positions"), (plot_gains, "gains"))]
    code = bench.finish(out, res, plots, build_markdown)
    return code if eval_ok else 1


if __name__ == "__main__":
    sys.exit(worker_main(_worker))
