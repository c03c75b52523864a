"""The front-end skeleton shared by ``gam bench compare`` (paper Table 1) and ``gam bench ablate``
(paper Table 3): one protocol (:mod:`gam.bench.protocols`), the runs
(:mod:`gam.bench.runs`), their summary over seeds and the checks that the protocol was the same
for every model, the loss-curve figure, and :func:`run_training_benchmark`, which both
commands' ``run`` are.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gam.bench.common import error_text
from gam.bench.environment import command_line, environment
from gam.bench.protocols import (
    DATASET_NOTES,
    Protocol,
    resolve_data_dir,
    resolve_protocol,
    seeds_of,
)
from gam.bench.reports import (
    environment_markdown,
    fmt,
    group_rows,
    new_figure,
    write_report,
    write_results,
)
from gam.bench.runs import (
    RunSpec,
    apply_model_args,
    check_models,
    execute_run,
    parameter_counts,
    prepare_dataset,
    run_dir_of,
    run_state,
)
from gam.runtime import resolve_device, set_threads
from gam.training import RuntimeOptions, read_metrics
from gam.training.rundir import dataset_slug

__all__ = ["SUMMARY_HEADERS", "Benchmark", "closing_markdown", "curves_file",
           "dataset_footer_markdown", "dataset_heading", "fmt_params", "fmt_pm", "mean_std",
           "ngram_markdown", "paper_params", "paper_reference", "plot_curves", "protocol_check",
           "run_training_benchmark", "summarize", "summary_cells"]


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


def seeds_cell(summary: dict[str, Any]) -> str:
    """The seeds a mean is over, with the failed and not-run ones counted beside."""
    notes = [f"{len(summary.get(key) or [])} {what}" for key, what in
             (("failed_seeds", "failed"), ("not_run_seeds", "not run")) if summary.get(key)]
    return f"{summary['n']}" + (f" ({', '.join(notes)})" if notes else "")


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, model) over the seeds that finished: mean and sample std of
    ``SUMMARY_FIELDS``, parameter counts, and the seeds used."""
    out = []
    for (dataset, model), members in group_rows(rows, "dataset", "model").items():
        ok = [r for r in members if r.get("status") == "ok"]
        entry: dict[str, Any] = {
            "dataset": dataset, "model": model,
            "group": members[0].get("group"),
            "seeds": [r["seed"] for r in ok],
            "failed_seeds": [r["seed"] for r in members
                             if r.get("status") not in ("ok", "not run")],
            "not_run_seeds": [r["seed"] for r in members if r.get("status") == "not run"],
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


def dataset_heading(dataset: str, info: dict[str, Any]) -> tuple[list[str], bool]:
    """The head of a dataset's report section (its note, or why it could not be loaded) and
    whether it loaded."""
    lines = [f"## {dataset}", ""]
    if info.get("note"):
        lines += [f"Note: {info['note']}", ""]
    if info.get("status") == "error":
        return [*lines, f"Not run: {info.get('error')}", ""], False
    return lines, True


def fmt_pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    text = fmt(mean, digits)
    if std is not None:
        text += f" ± {fmt(std, digits)}"
    return text


def fmt_params(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def plot_curves(rows: Sequence[dict[str, Any]], dataset: str, path: Path,
                title: str) -> Path | None:
    """Train loss vs step and validation loss per evaluation, every run of ``dataset`` on one
    figure (one colour per model, one line style per seed)."""
    runs = [r for r in rows if r["dataset"] == dataset and r.get("status") == "ok"]
    if not runs:
        return None
    fig, (ax_train, ax_val) = new_figure(ncols=2)
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


def check_markdown(check: dict[str, Any] | None) -> list[str]:
    """The line that says whether tokenizer, data and steps were the same for every run."""
    if not check:
        return []
    return ["", f"Identical tokenizer: {check['identical_tokenizer']}; identical data: "
                f"{check['identical_data']}; identical steps: {check['identical_steps']} "
                f"({check['steps']})."]


#: the columns of ``summary_cells``
SUMMARY_HEADERS = ("params", "non-emb params", "steps", "s / epoch", "tokens/s", "val loss",
                   "val ppl", "seeds")


def summary_cells(summary: dict[str, Any]) -> list[str]:
    """A model's cells of a report table (``SUMMARY_HEADERS``) from its ``summarize`` row:
    mean ± sample std over seeds, the time per epoch marked when extrapolated."""
    s = summary
    basis = " (extrapolated)" if s.get("epoch_time_basis") == "extrapolated" else ""
    return [fmt_params(s["params_total"]), fmt_params(s["params_non_embedding"]),
            fmt(s.get("steps")), fmt_pm(s["epoch_time_s_mean"], s["epoch_time_s_std"], 1) + basis,
            fmt(s["tokens_per_s_mean"], 0), fmt_pm(s["val_loss_mean"], s["val_loss_std"], 4),
            fmt_pm(s["val_ppl_mean"], s["val_ppl_std"], 2), seeds_cell(s)]


def curves_file(dataset: str) -> str:
    """The name of a dataset's loss-curve figure (``plot_curves``) in the output folder."""
    return f"curves-{dataset_slug(dataset)}.png"


def dataset_footer_markdown(results: dict[str, Any], dataset: str) -> list[str]:
    """The end of a dataset's report section: the protocol check and the loss curves."""
    return [*check_markdown(results["protocol_check"].get(dataset)),
            "", f"![curves]({curves_file(dataset)})", ""]


def closing_markdown(results: dict[str, Any], note: str, with_dataset: bool) -> list[str]:
    """The end of a report: the runs that did not finish, ``note`` and the command and
    environment."""
    return [*failed_markdown(results["runs"], with_dataset), note, "",
            environment_markdown(results["environment"], results["command"])]


def failed_markdown(runs: Sequence[dict[str, Any]], with_dataset: bool) -> list[str]:
    """A section listing every run that did not finish, failed or not run (nothing if none)."""
    failed = [r for r in runs if r.get("status") != "ok"]
    if not failed:
        return []
    return ["## Runs not finished (failed or not run)", "", *(
        f"- {r['dataset'] + ' / ' if with_dataset else ''}{r['model']} seed {r['seed']}: "
        f"{r['status']}: {r.get('error', '')[:300]}" for r in failed), ""]


def paper_params(model: str) -> dict[str, int] | None:
    """Our parameter count of ``model`` at the paper preset (vocabulary 10,000) with the
    paper's initialisation (tied head), to set beside the paper's."""
    try:
        return parameter_counts(model, "paper", {"init": "paper"})
    except Exception:  # noqa: BLE001 - informative only
        return None


def paper_reference(table: dict[str, Any], models: Sequence[str]) -> dict[str, Any]:
    """What results.json sets beside the runs: the paper's ``table`` and our parameter count
    of each of ``models`` at the paper preset (``paper_params``)."""
    return {"paper": table, "paper_preset_params": {m: paper_params(m) for m in models}}


# ------------------------------------------------------------------------------ benchmark
class Benchmark:
    """Runs specs under one protocol and keeps the rows; the front ends (compare, ablate)
    decide what to run and how to present it."""

    def __init__(self, args: argparse.Namespace, command: str,
                 protocol: Protocol | None = None) -> None:
        self.args = args
        self.command = command
        self.protocol = protocol or resolve_protocol(args)
        self.seeds = seeds_of(args)
        self.out = Path(args.out)
        self.data_dir, self.data_dir_explicit = resolve_data_dir(
            getattr(args, "data_dir", None))
        self.data_dirs: dict[str, str | None] = {}  # per dataset: where it was found
        self.cache_dir = getattr(args, "cache_dir", None)
        self.device = resolve_device(args.device)
        # the load-average rule of the trainer, so that the threads recorded are those used
        self.threads = set_threads(args.threads)
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
                    "error": f"{type(exc).__name__}: {error_text(exc)}"}
            self.log(f"{dataset}: cannot be loaded: {type(exc).__name__}: "
                     f"{error_text(exc)}")
        self.datasets[dataset] = info
        return info

    def _skipped(self, spec: RunSpec, status: str, error: str) -> dict[str, Any]:
        """The row of a run that was not trained here."""
        return {"dataset": spec.dataset, "model": spec.label, "seed": spec.seed,
                "group": spec.group, **spec.extra, "run_dir": str(run_dir_of(self.out, spec)),
                "status": status, "action": "skipped", "error": error}

    def run(self, spec: RunSpec, write: Callable[[], None] | None = None,
            protocol: Protocol | None = None) -> dict[str, Any]:
        """Train, resume or reuse ``spec`` under ``protocol`` (default: the benchmark's) and
        keep its row."""
        info = self.datasets.get(spec.dataset)
        if info is None:
            info = self.prepare(spec.dataset)
        if info.get("status") != "ok":
            row = self._skipped(spec, "error", f"dataset unavailable: {info.get('error')}")
        elif self.report_only and run_state(run_dir_of(self.out, spec))[0] != "finished":
            row = self._skipped(spec, "not run", "not finished (--report-only trains nothing)")
        else:
            row = execute_run(spec, protocol or self.protocol, self.out,
                              self.data_dirs.get(spec.dataset), self.options, self.log)
            if row.get("status") == "ok":
                self.log(f"[{spec.label} seed {spec.seed} on {spec.dataset}] val loss "
                         f"{fmt(row.get('val_loss'), 4)}, ppl "
                         f"{fmt(row.get('val_ppl'), 2)}, "
                         f"{fmt(row.get('tokens_per_s'), 0)} tok/s")
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
            "environment": environment(self.device, self.threads),
            "command": command_line(self.command, getattr(self.args, "argv", [])),
        }

    def finish(self, out: Path, res: dict[str, Any], plots: Sequence[Callable[[Path], Any]],
               build_markdown: Callable[[dict[str, Any]], str]) -> int:
        """Draw the plots, write the final results, print the table, return the exit code."""
        write_report(out, res, build_markdown, plots)
        return self.exit_code()

    @property
    def report_only(self) -> bool:
        return bool(getattr(self.args, "report_only", False))

    def exit_code(self) -> int:
        done = ("ok", "not run") if self.report_only else ("ok",)
        return 0 if self.rows and all(r.get("status") in done for r in self.rows) else 1


def run_training_benchmark(
        args: argparse.Namespace, command: str,
        build_specs: Callable[[Benchmark], list[RunSpec]],
        results: Callable[[Benchmark], dict[str, Any]],
        plots: Callable[[Benchmark, dict[str, Any]], Sequence[Callable[[Path], Any]]],
        build_markdown: Callable[[dict[str, Any]], str]) -> int:
    """``run`` of compare and ablate: build the specs (a ValueError is a usage error: exit 2),
    train / resume / reuse each one, writing the partial results after every run, then write
    the final results with their plots and print the table."""
    try:
        bench = Benchmark(args, command)
        specs = build_specs(bench)
        apply_model_args(specs, args)
        check_models(specs, bench.protocol)
    except ValueError as exc:
        print(f"gam bench {command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)

    def write() -> None:
        res = results(bench)
        write_results(out, res, build_markdown(res))

    for spec in specs:
        bench.run(spec, write)
    res = results(bench)
    return bench.finish(out, res, plots(bench, res), build_markdown)
