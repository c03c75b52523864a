"""``gam bench listops``'s report: the summary over seeds, ``results.md`` with the published
LRA numbers beside ours, and the validation-accuracy curves (``listops.png``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gam.bench.reports import environment_markdown, fmt, markdown_table, new_figure, write_results

PUBLISHED = {  # LRA Table 1 (Tay et al. 2021) and S4 (Gu et al. 2022), test accuracy (%)
    "Transformer (LRA)": 36.37, "Reformer (LRA)": 37.27, "Linear Transformer (LRA)": 16.13,
    "Performer (LRA)": 18.01, "S4 (6 layers, d 256, bidirectional)": 59.5,
}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: mean and std over its finished seeds."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        ok = [r for r in runs if r["model"] == model and r["status"] == "ok"]
        row: dict[str, Any] = {"model": model, "runs": len(ok),
                               "status": "ok" if ok else next(
                                   r["status"] for r in runs if r["model"] == model)}
        for key in ("test_accuracy", "test_accuracy_final", "best_valid_accuracy",
                    "tokens_per_s", "train_seconds"):
            vals = [r[key] for r in ok if r.get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        row["test_accuracy_per_seed"] = {r["seed"]: r["test_accuracy"] for r in ok}
        for key in ("receptive_field", "parameters"):
            row[key] = ok[0][key] if ok else None
        rows.append(row)
    return rows


def pct(mean: float | None, std: float | None = None) -> str:
    """A fraction as a percentage (``"-"`` for None), with its std when given."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


READOUT_WORDS = {"last": "at the last real token", "mean": "as the mean over the real tokens"}


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the summary, every run and the published numbers."""
    s = results["settings"]
    p = s["protocol"]
    data = results["data"]
    head = (f"# gam bench listops: LRA ListOps test accuracy (%), protocol {s['protocol_name']}"
            f", lengths {p['min_len']}-{p['max_len']}, d {p['d_model']}, {p['n_layers']} "
            f"layers, {p['steps']} steps of {p['batch_size']}")
    summary = markdown_table(
        ["model", "test acc (best valid)", "test acc (final)", "best valid acc", "per seed",
         "params", "receptive field", "train tokens/s", "train s"],
        [[r["model"], pct(r["test_accuracy"], r["test_accuracy_std"]),
          pct(r["test_accuracy_final"], r["test_accuracy_final_std"]),
          pct(r["best_valid_accuracy"]),
          " / ".join(f"{100 * v:.1f}" for v in r["test_accuracy_per_seed"].values()) or
          r["status"], f"{r['parameters']:,}" if r["parameters"] else "-",
          fmt(r["receptive_field"]),
          fmt(r["tokens_per_s"], 0), fmt(r["train_seconds"], 0)]
         for r in results["summary"]])
    runs = markdown_table(
        ["model", "seed", "status", "test acc (best valid)", "best step", "test acc (final)",
         "train tokens/s", "action"],
        [[r["model"], r["seed"], r["status"], pct(r.get("test_accuracy")),
          r.get("best_step", "-"), pct(r.get("test_accuracy_final")),
          fmt(r.get("tokens_per_s"), 0), r.get("action", "-")] for r in results["runs"]])
    published = markdown_table(
        ["published (LRA: lengths 500-2000, bidirectional encoders)", "test acc (%)"],
        [[k, f"{v:.2f}"] for k, v in PUBLISHED.items()])
    return "\n".join([
        head, "", environment_markdown(results["environment"], results["command"]), "",
        f"Test accuracy of the weights with the best validation accuracy (mean ± std over "
        f"seeds {s['seeds']}); 'final' = the weights after the last step. Majority class on "
        f"test: {100 * data['majority_test']:.1f}% (class {data['majority_class']}). Data: "
        f"{p['n_train']:,} / {p['n_valid']:,} / {p['n_test']:,} sequences, mean length "
        f"{data['mean_length_train']:.0f} tokens, depth <= {p['max_depth']}, data seed "
        f"{s['data_seed']}; read out {READOUT_WORDS[p.get('readout', 'last')]} of a causal "
        f"model.", "",
        summary, "", "## Runs", "", runs, "", "## Published", "", published])


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Validation accuracy by step of every finished run, with the majority-class line."""
    fig, (ax,) = new_figure(1, width=6.5, height=4.5)
    colors: dict[str, Any] = {}
    for r in results["runs"]:
        if r["status"] != "ok" or not r.get("curve"):
            continue
        color = colors.setdefault(r["model"], f"C{len(colors)}")
        steps = [c["step"] for c in r["curve"]]
        accs = [100 * c["valid_accuracy"] for c in r["curve"]]
        ax.plot(steps, accs, "o-", ms=3, color=color,
                label=f"{r['model']} seed {r['seed']}",
                alpha=1.0 if r["seed"] == results["settings"]["seeds"][0] else 0.55)
    ax.axhline(100 * results["data"]["majority_valid"], ls="--", color="gray",
               label="majority class (valid)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy (%)")
    p = results["settings"]["protocol"]
    ax.set_title(f"ListOps {p['min_len']}-{p['max_len']} tokens, d {p['d_model']}, "
                 f"{p['n_layers']} layers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def write_listops_results(out: Path, results: dict[str, Any]) -> None:
    """The summary, then results.json / results.md and listops.png in ``out``."""
    results["summary"] = summarize(results["runs"])
    write_results(out, results, results_markdown(results))
    plot_curves(results, out / "listops.png")
