"""``gam bench ablate``: the paper's Table 3 -- what each part of the GAM block contributes --
and a memory-capacity sweep.

Variants (``--variants``, ``build_model`` names): ``gam`` (full: local convolution + global
memory, fused by the sigmoid gates), ``gam-global-only`` (memory path only, no gate),
``gam-sum`` (both paths, fused by a plain sum instead of the gates), ``gam-local-only``
(convolution only, no gate). ``--slots 128 256 512 1024`` also trains the full model with each
number of memory slots (``num_memory_slots``; the paper lists this sweep as future work). A
slot count equal to the preset's own is the full model itself, whose run is shared.

Same protocol, presets, resumability and outputs as ``gam bench compare`` (see
``gam.bench.protocols``; default dataset WikiText-2): ``results.json`` (``runs``,
``summary``, ``paper``: the parameter counts of the paper's Table 3, ``environment``,
``command``), ``results.md``, ``curves-<dataset>.png`` (training / validation loss of the
variants) and, with ``--slots``, ``slots-<dataset>.png`` (validation perplexity vs slots).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gam.bench import training_bench as tb
from gam.bench.protocols import Protocol, add_protocol_arguments, protocol_markdown
from gam.bench.reports import fmt, markdown_table, new_figure
from gam.bench.runs import RunSpec
from gam.models.registry import model_config
from gam.training.rundir import dataset_slug

DEFAULT_VARIANTS = ["gam", "gam-global-only", "gam-sum", "gam-local-only"]

# arXiv 2509.00605, Table 3 (paper preset, WikiText-2). Only the parameter counts are recorded
# here: the table's perplexities are not reproduced in this file (not verified).
PAPER_TABLE3: dict[str, Any] = {
    "source": "arXiv 2509.00605, Table 3 (ablations, paper model size): parameter counts "
              "in millions",
    "params_millions": {"gam": 22.6, "gam-global-only": 19.4, "gam-sum": 19.4,
                        "gam-local-only": 17.9},
    "labels": {"gam": "Full GAM", "gam-global-only": "global path only",
               "gam-sum": "sum fusion (no gates)", "gam-local-only": "local path only"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Paper Table 3: the GAM ablations (full, global-only, sum fusion, local-only) under "
        "the compare protocol, plus an optional memory-slot sweep of the full model. "
        "Resumable: a run folder (OUT/runs/<dataset>/<variant>-seed<k>) that already holds a "
        "finished run with the same configuration is reused instead of retrained, and an "
        "unfinished one is resumed, so an interrupted benchmark is re-run with the same "
        "command.")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME",
                        help="build_model names of the variants (gam, gam-global-only, gam-sum, "
                             "gam-local-only, or any other)")
    parser.add_argument("--slots", type=int, nargs="+", default=None, metavar="N",
                        help="also train the full model with each number of memory slots "
                             "(e.g. 128 256 512 1024; default: no slot sweep)")
    parser.add_argument("--dataset", default="wikitext2",
                        help="wikitext2 (the paper's), austen (stand-in for TinyStories), "
                             "tinystories, or text:PATH")
    add_protocol_arguments(parser)


def _preset_slots(protocol: Protocol) -> int | None:
    try:
        return int(model_config("gam", protocol.model_preset).num_memory_slots)
    except Exception:  # noqa: BLE001
        return None


def build_specs(args: argparse.Namespace, protocol: Protocol, seeds: list[int]
                ) -> list[RunSpec]:
    """Variants first, then the slot sweep; a sweep point equal to the preset's slot count is
    the plain ``gam`` run when ``gam`` is among the variants (same folder, reused)."""
    if len(set(args.variants)) != len(args.variants):
        raise ValueError(f"--variants lists a variant twice: {args.variants}")
    slots = list(args.slots or [])
    if any(s < 1 for s in slots) or len(set(slots)) != len(slots):
        raise ValueError(f"--slots must be distinct positive integers, got {slots}")
    default_slots = _preset_slots(protocol)
    specs = []
    for seed in seeds:
        specs += [RunSpec(dataset=args.dataset, model=v, seed=seed, group="variants")
                  for v in args.variants]
    for seed in seeds:
        for n in slots:
            if n == default_slots and "gam" in args.variants:
                specs.append(RunSpec(dataset=args.dataset, model="gam", seed=seed,
                                        label="gam", group="slots",
                                        extra={"slots": n, "same_run_as": "gam"}))
            else:
                specs.append(RunSpec(dataset=args.dataset, model="gam", seed=seed,
                                        label=f"gam-slots{n}",
                                        overrides={"num_memory_slots": n}, group="slots",
                                        extra={"slots": n}))
    return specs


def plot_slots(sweep: list[dict[str, Any]], path: Path, dataset: str) -> Path | None:
    points = [s for s in sweep if s.get("val_ppl_mean") is not None]
    if not points:
        return None
    fig, (ax,) = new_figure()
    xs = [p["slots"] for p in points]
    ys = [p["val_ppl_mean"] for p in points]
    errs = [p["val_ppl_std"] or 0.0 for p in points]
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("memory slots (num_memory_slots)")
    ax.set_ylabel("final validation perplexity")
    ax.set_title(f"GAM memory capacity ({dataset})")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def build_markdown(results: dict[str, Any]) -> str:
    protocol = Protocol.from_dict(results["protocol"])
    dataset = results["dataset"]
    info = results["datasets"].get(dataset, {})
    lines = ["# GAM ablations (paper Table 3)", "",
             protocol_markdown(protocol, results["seeds"]), "", f"Dataset: {dataset}.", ""]
    if info.get("note"):
        lines += [f"Note: {info['note']}", ""]
    if info.get("status") == "error":
        lines += [f"Not run: {info.get('error')}", ""]
    paper = PAPER_TABLE3["params_millions"]
    ours_paper = results.get("paper_preset_params", {})
    summary = {s["model"]: s for s in results["summary"]}
    rows = []
    for v in results["variants"]:
        s = summary.get(v)
        if s is None:
            continue
        at_paper = ours_paper.get(v) or {}
        rows.append([v, PAPER_TABLE3["labels"].get(v, ""), *tb.summary_cells(s),
                     tb.fmt_params(at_paper.get("total")),
                     f"{paper[v]:.1f}M" if v in paper else "-"])
    if rows:
        lines.append(markdown_table(
            ["variant", "", *tb.SUMMARY_HEADERS, "params at paper size (ours)", "paper params"],
            rows))
        lines += tb.ngram_markdown(info)
    sweep = results.get("slots_sweep") or []
    if sweep:
        lines += ["", "## Memory slots (full model)", "",
                  markdown_table(
                      ["slots", "run", "params", "s / epoch", "tokens/s", "val loss", "val ppl",
                       "seeds"],
                      [[p["slots"], p["model"], tb.fmt_params(p["params_total"]),
                        tb.fmt_pm(p["epoch_time_s_mean"], p["epoch_time_s_std"], 1),
                        fmt(p["tokens_per_s_mean"], 0),
                        tb.fmt_pm(p["val_loss_mean"], p["val_loss_std"], 4),
                        tb.fmt_pm(p["val_ppl_mean"], p["val_ppl_std"], 2), tb.seeds_cell(p)]
                       for p in sweep]),
                  "", f"![slots](slots-{dataset_slug(dataset)}.png)"]
    lines += tb.dataset_footer_markdown(results, dataset)
    lines += tb.closing_markdown(
        results, f"Mean ± sample std over seeds. Paper params: {PAPER_TABLE3['source']}; the "
        "paper's ablation perplexities are not recorded here. 'params at paper size (ours)': "
        "our implementation at the paper preset.", with_dataset=False)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    def specs(bench: tb.Benchmark) -> list[RunSpec]:
        return build_specs(args, bench.protocol, bench.seeds)

    def results(bench: tb.Benchmark) -> dict[str, Any]:
        res = bench.base_results()
        # the summary of the variants must not mix in the sweep's rows of the shared gam run
        variant_rows = [r for r in bench.rows if r.get("group") == "variants"]
        sweep_rows = [r for r in bench.rows if r.get("group") == "slots"]
        res["summary"] = tb.summarize(variant_rows)
        sweep = tb.summarize(sweep_rows)
        slots_of = {r["model"]: r["slots"] for r in sweep_rows}
        for s in sweep:
            s["slots"] = slots_of.get(s["model"])
        res["slots_sweep"] = sorted(sweep, key=lambda s: s["slots"] or 0)
        res["dataset"] = args.dataset
        res["variants"] = list(args.variants)
        res["slots"] = list(args.slots or [])
        res.update(tb.paper_reference(PAPER_TABLE3, args.variants))
        return res

    def plots(bench: tb.Benchmark, res: dict[str, Any]) -> list[Any]:
        slug = dataset_slug(args.dataset)
        variant_rows = [r for r in bench.rows if r.get("group") == "variants"]
        out = [lambda o: tb.plot_curves(variant_rows or bench.rows, args.dataset,
                                        o / tb.curves_file(args.dataset),
                                        f"{args.dataset}, ablations")]
        if res["slots_sweep"]:
            out.append(lambda o: plot_slots(res["slots_sweep"], o / f"slots-{slug}.png",
                                            args.dataset))
        return out

    return tb.run_training_benchmark(args, "ablate", specs, results, plots, build_markdown)
