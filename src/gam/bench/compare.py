"""``gam bench compare``: the paper's Table 1 -- GAM vs a Transformer and Mamba, trained and
evaluated under one protocol.

Each model of ``--models`` (any ``build_model`` names; default gam, transformer, mamba) is
trained on each dataset of ``--datasets`` (wikitext2, austen, tinystories, text:PATH) with the
library's ``train()``, with identical data, tokenizer (trained once per dataset), number of steps,
seed and data order, into ``OUT/runs/<dataset>/<model>-seed<k>/``; see
``gam.bench.protocols`` for the protocol, its presets (``--preset paper``: the paper's exact
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
from typing import Any

from gam.bench import training_bench as tb
from gam.bench.protocols import Protocol, add_protocol_arguments, protocol_markdown
from gam.bench.reports import fmt, markdown_table
from gam.bench.runs import RunSpec
from gam.bench.tasks import check_distinct

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
    add_protocol_arguments(parser)


def paper_figures(dataset: str, model: str) -> dict[str, Any]:
    return PAPER_TABLE1.get(dataset, {}).get(PAPER_ROW.get(model, ""), {})


def build_markdown(results: dict[str, Any]) -> str:
    protocol = Protocol.from_dict(results["protocol"])
    lines = ["# GAM vs Transformer vs Mamba (paper Table 1)", "",
             protocol_markdown(protocol, results["seeds"]), ""]
    summary = results["summary"]
    for dataset in results["datasets_requested"]:
        info = results["datasets"].get(dataset, {})
        head, loaded = tb.dataset_heading(dataset, info)
        lines += head
        if not loaded:
            continue
        rows = []
        for s in (s for s in summary if s["dataset"] == dataset):
            paper = paper_figures(dataset, s["model"])
            rows.append([s["model"], *tb.summary_cells(s), fmt(paper.get("val_ppl"), 2),
                         fmt(paper.get("epoch_time_s"), 1)])
        lines.append(markdown_table(
            ["model", *tb.SUMMARY_HEADERS, "paper ppl", "paper s / epoch"], rows))
        lines += tb.ngram_markdown(info)
        lines += tb.dataset_footer_markdown(results, dataset)
    lines += tb.closing_markdown(
        results, "Mean ± sample std over seeds. s / epoch: training steps only (evaluation "
        "excluded), measured over complete epochs, or extrapolated from the time per step when "
        f"the step budget ends within the first epoch. Paper figures: {PAPER_TABLE1['source']}; "
        "they are for the `paper` preset on a GPU, so times and perplexities of other presets "
        "or hardware are not directly comparable.", with_dataset=True)
    return "\n".join(lines)

def run(args: argparse.Namespace) -> int:
    def specs(bench: tb.Benchmark) -> list[RunSpec]:
        check_distinct(args.models)
        return [RunSpec(dataset=d, model=m, seed=k)
                for d in args.datasets for k in bench.seeds for m in args.models]

    def results(bench: tb.Benchmark) -> dict[str, Any]:
        res = bench.base_results()
        res["datasets_requested"] = list(args.datasets)
        res["models"] = list(args.models)
        res.update(tb.paper_reference(PAPER_TABLE1, args.models))
        return res

    def plots(bench: tb.Benchmark, res: dict[str, Any]) -> list[Any]:
        return [lambda out, d=d: tb.plot_curves(bench.rows, d, out / tb.curves_file(d), d)
                for d in args.datasets]

    return tb.run_training_benchmark(args, "compare", specs, results, plots, build_markdown)
