"""``gam bench compare``: the paper's Table 1 -- GAM vs a Transformer and Mamba, trained and
evaluated under one protocol.

Each model of ``--models`` (any ``build_model`` names; default gam, transformer, mamba) is
trained on each dataset of ``--datasets`` (wikitext2, austen, tinystories, text:PATH) with the
library's ``train()``, with identical data, tokenizer (trained once per dataset), number of steps,
seed and data order, into ``OUT/runs/<dataset>/<model>-seed<k>/``; see
``gam.bench.training_runs`` for the protocol, its presets (``--preset paper``: the paper's exact
setup, meant for a GPU; ``--preset cpu``: scaled to a 2-core CPU; ``--quick``) and how finished
runs are reused and interrupted ones resumed.

Reported per (dataset, model): parameters (total, non-embedding), average training time per
epoch (training steps only), training tokens/s, final validation loss and perplexity
(token-weighted, the library's evaluation), with mean and sample std over ``--seeds``, next to
the paper's Table 1 figures for WikiText-2. Writes ``results.json`` (``runs``: one row per
dataset x model x seed; ``summary``: mean/std per dataset x model; ``paper``; ``protocol_check``:
whether tokenizer, data and steps were identical; ``environment``; ``command``), ``results.md``
and ``curves-<dataset>.png`` (training loss vs step and validation loss per evaluation, all
models on one figure).

Austen's novels (``austen``) stand in for TinyStories, which is not available offline; results on
it are labelled as such and are not comparable with the paper's TinyStories numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gam.bench import common
from gam.bench import training_runs as tr

DEFAULT_MODELS = ["gam", "transformer", "mamba"]
DEFAULT_DATASETS = ["wikitext2"]

# arXiv 2509.00605, Table 1 (WikiText-2, paper setup: 5 epochs on a GPU).
PAPER_TABLE1: dict[str, Any] = {
    "source": "arXiv 2509.00605, Table 1: WikiText-2, paper model sizes, 5 epochs, on a GPU "
              "(final validation perplexity; average training time per epoch in seconds)",
    "wikitext2": {
        "gam": {"val_ppl": 882.57, "epoch_time_s": 117.2},
        "transformer": {"val_ppl": 918.99, "epoch_time_s": 131.9},
        "mamba": {"val_ppl": 1017.54, "epoch_time_s": 127.1},
    },
}
# Our model names -> the paper's row.
PAPER_ROW = {"gam": "gam", "transformer": "transformer", "transformer-naive": "transformer",
             "mamba": "mamba", "mamba-paper": "mamba"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Paper Table 1: train and evaluate each model on each dataset with identical data, "
        "tokenizer, steps and seed; report parameters, time per epoch, tokens/s and final "
        "validation loss/perplexity next to the paper's figures. Resumable: a run folder "
        "(OUT/runs/<dataset>/<model>-seed<k>) that already holds a finished run with the same "
        "configuration is reused instead of retrained, and an unfinished one is resumed from "
        "its last checkpoint, so an interrupted benchmark is re-run with the same command. "
        "austen (Jane Austen's novels) stands in for TinyStories, which is not available "
        "offline.")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME",
                        help="build_model names (gam, transformer, mamba, mamba-paper, "
                             "transformer-naive, gam-sum, ...)")
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, metavar="NAME",
                        help="wikitext2, austen (stand-in for TinyStories), tinystories, or "
                             "text:PATH")
    tr.add_protocol_arguments(parser)


def paper_figures(dataset: str, model: str) -> dict[str, Any]:
    return PAPER_TABLE1.get(dataset, {}).get(PAPER_ROW.get(model, ""), {})


def build_markdown(results: dict[str, Any]) -> str:
    protocol = tr.Protocol(**results["protocol"])
    lines = ["# GAM vs Transformer vs Mamba (paper Table 1)", "",
             tr.protocol_markdown(protocol, results["seeds"]), ""]
    summary = results["summary"]
    for dataset in results["datasets_requested"]:
        info = results["datasets"].get(dataset, {})
        lines += [f"## {dataset}", ""]
        if info.get("note"):
            lines += [f"Note: {info['note']}", ""]
        if info.get("status") == "error":
            lines += [f"Not run: {info.get('error')}", ""]
            continue
        rows = []
        for s in (s for s in summary if s["dataset"] == dataset):
            paper = paper_figures(dataset, s["model"])
            basis = " (extrapolated)" if s.get("epoch_time_basis") == "extrapolated" else ""
            rows.append([
                s["model"], tr.fmt_params(s["params_total"]),
                tr.fmt_params(s["params_non_embedding"]), common.fmt(s.get("steps")),
                tr.fmt_pm(s["epoch_time_s_mean"], s["epoch_time_s_std"], 1) + basis,
                common.fmt(s["tokens_per_s_mean"], 0),
                tr.fmt_pm(s["val_loss_mean"], s["val_loss_std"], 4),
                tr.fmt_pm(s["val_ppl_mean"], s["val_ppl_std"], 2),
                f"{s['n']}" + (f" ({len(s['failed_seeds'])} failed)" if s["failed_seeds"]
                               else ""),
                common.fmt(paper.get("val_ppl"), 2), common.fmt(paper.get("epoch_time_s"), 1),
            ])
        lines.append(common.markdown_table(
            ["model", "params", "non-emb params", "steps", "s / epoch", "tokens/s",
             "val loss", "val ppl", "seeds", "paper ppl", "paper s / epoch"], rows))
        lines += tr.ngram_markdown(info)
        check = results["protocol_check"].get(dataset)
        if check:
            lines += ["", f"Identical tokenizer: {check['identical_tokenizer']}; identical data: "
                          f"{check['identical_data']}; identical steps: "
                          f"{check['identical_steps']} ({check['steps']})."]
        lines += ["", f"![curves](curves-{tr.dataset_slug(dataset)}.png)", ""]
    failed = [r for r in results["runs"] if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {r['dataset']} / {r['model']} seed {r['seed']}: {r['status']}: "
                  f"{r.get('error', '')[:300]}" for r in failed]
        lines.append("")
    lines += ["Mean ± sample std over seeds. s / epoch: training steps only (evaluation "
              "excluded), measured over complete epochs, or extrapolated from the time per "
              "step when the step budget ends within the first epoch. Paper figures: "
              f"{PAPER_TABLE1['source']}; they are for the `paper` preset on a GPU, so times "
              "and perplexities of other presets or hardware are not directly comparable.", "",
              common.environment_markdown(results["environment"], results["command"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        bench = tr.Benchmark(args, "compare")
        specs = [tr.RunSpec(dataset=d, model=m, seed=k)
                 for d in args.datasets for k in bench.seeds for m in args.models]
        if len(set(args.models)) != len(args.models):
            raise ValueError(f"--models lists a model twice: {args.models}")
        tr.apply_model_args(specs, args)
        tr.check_models(specs, bench.protocol)
    except ValueError as exc:
        print(f"gam bench compare: error: {exc}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)

    def results() -> dict[str, Any]:
        res = bench.base_results()
        res["datasets_requested"] = list(args.datasets)
        res["models"] = list(args.models)
        res["paper"] = PAPER_TABLE1
        res["paper_preset_params"] = {m: _paper_params(m) for m in args.models}
        return res

    def write() -> dict[str, Any]:
        res = results()
        common.write_results(out, res, build_markdown(res))
        return res

    for spec in specs:
        bench.run(spec, write)
    res = results()
    plots = []
    for dataset in args.datasets:
        path = tr.plot_curves(bench.rows, dataset, out / f"curves-{tr.dataset_slug(dataset)}.png",
                              dataset)
        if path is not None:
            plots.append(path.name)
    return bench.finish(out, res, plots, build_markdown)


def _paper_params(model: str) -> dict[str, int] | None:
    """Our parameter count of ``model`` at the paper preset (vocabulary 10,000), to set beside
    the paper's."""
    try:
        return tr.parameter_counts(model, "paper", {})
    except Exception:  # noqa: BLE001 - informative only
        return None
