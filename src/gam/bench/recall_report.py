"""The outputs of ``gam bench recall``: the summary rows, results.json, results.md and the plot
(written atomically after every configuration, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gam.bench.environment import finish_environment
from gam.bench.reports import (
    environment_markdown,
    fmt,
    group_rows,
    json_safe,
    markdown_table,
    new_figure,
)
from gam.bench.training_bench import fmt_pm, mean_std
from gam.files import atomic_write_bytes

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def choose_lr(configs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished configuration with the best mean validation accuracy (ties: fewer steps,
    then the smaller lr); None if none finished."""
    ok = [c for c in configs if c.get("status") == "ok"]
    if not ok:
        return None
    return max(ok, key=lambda c: (round(c["val_accuracy"], 6), -c["steps"], -c["lr"]))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a rate ``successes / n`` (None for n = 0): unlike
    rate +- z * se it stays inside [0, 1] and is not empty at 0 / n or n / n."""
    if n == 0:
        return None
    rate, z2 = successes / n, z * z
    center = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def solved(config: dict[str, Any], threshold: float) -> bool:
    """Every pair count's test accuracy reaches ``threshold``."""
    return all(r["accuracy"] >= threshold for r in config["pairs"].values())


def mean_test_accuracy(config: dict[str, Any]) -> float:
    """A finished run's test accuracy: the mean over its pair counts."""
    return sum(r["accuracy"] for r in config["pairs"].values()) / len(config["pairs"])


def recall_rates(configs: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """One row per (model, length) over its finished runs (every seed and lr): runs, solved
    runs, the rate with its Wilson 95% interval, the test accuracy's mean and sample std, and
    per lr the solved and finished runs."""
    rows = []
    for (model, t), group in group_rows(configs, "model", "seq_len").items():
        ok = [c for c in group if c.get("status") == "ok"]
        n_solved = sum(solved(c, threshold) for c in ok)
        mean, std, _ = mean_std([mean_test_accuracy(c) for c in ok])
        interval = wilson_interval(n_solved, len(ok))
        by_lr = {}
        for c in ok:
            counts = by_lr.setdefault(f"{c['lr']:g}", [0, 0])
            counts[0] += solved(c, threshold)
            counts[1] += 1
        rows.append({"model": model, "seq_len": t, "runs": len(ok), "solved": n_solved,
                     "not_finished": len(group) - len(ok),
                     "rate": n_solved / len(ok) if ok else None,
                     "rate_low": interval[0] if interval else None,
                     "rate_high": interval[1] if interval else None,
                     "accuracy_mean": mean, "accuracy_std": std,
                     "solved_by_lr": {lr: {"solved": k, "runs": n} for lr, (k, n)
                                      in by_lr.items()}})
    return rows


def _summary(configs: list[dict[str, Any]], variants: list[str], seq_lens: list[int],
             seeds: list[int]) -> list[dict[str, Any]]:
    """One row per (model, length, seed, pairs) at that seed's chosen lr."""
    rows = []
    for t in seq_lens:
        for v, run_seed in ((v, k) for k in seeds for v in variants):
            group = [c for c in configs if c["model"] == v and c["seq_len"] == t
                     and c["seed"] == run_seed]
            if not group:
                continue
            best = choose_lr(group)
            ref = best or group[-1]
            for q in ref["pairs_trained"]:
                row: dict[str, Any] = {"model": v, "seq_len": t, "seed": run_seed,
                                       "num_kv_pairs": q,
                                       "init": ref["init"], "tied": ref["tied"],
                                       "copy_plateau": 1.0 / q,
                                       "lrs_tried": [c["lr"] for c in group]}
                if best is None:
                    row.update(status=ref["status"], accuracy=None, error=ref.get("error"))
                else:
                    r = best["pairs"][str(q)]
                    row.update(status="ok", accuracy=r["accuracy"],
                               val_accuracy=r["val_accuracy"], queries=r["queries"],
                               reachable_fraction=r["reachable_fraction"],
                               receptive_field=best["receptive_field"], lr=best["lr"],
                               steps=best["steps"], stop_reason=best["stop_reason"],
                               train_seconds=best["train_seconds"])
                rows.append(row)
    return rows


def _markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    p = s["protocol"]
    runs = results["runs"]
    parts = [f"# gam bench recall: MQAR test accuracy on query positions (%), d {p['d_model']}, "
             f"{p['n_layers']} layers, vocab {p['vocab_size']}", "",
             environment_markdown(results["environment"], results["command"]), "",
             f"One model per (model, length, lr), trained on that length's pair counts mixed in "
             f"each batch, {p['steps']} steps of {p['tokens_per_step']} tokens (AdamW, weight "
             f"decay {p['weight_decay']}, warm-up {100 * p['warmup_fraction']:g}% then cosine, "
             f"clip 1), stopped early when every pair count reaches "
             f"{100 * p['target_accuracy']:g}% validation accuracy; the lr is chosen per "
             f"(model, length{', seed' if len(s['seeds']) > 1 else ''}) among {s['lrs']} "
             f"on {p['val_examples']} validation sequences per pair count; accuracy on "
             f"{p['test_examples']} test sequences (other seeds). "
             f"Filler: {'random tokens' if p['random_filler'] else '0'}. Query slots: "
             f"{_query_slots(p.get('query_power_a'))}. {_mix(p.get('mix') or [])} 'copy' = 100/P "
             f"(copying any value of the context); 'reachable (rf r)' = queries whose pair "
             f"lies inside a receptive field of r tokens (GAM's), the most GAM can recall."]
    for t in s["seq_lens"]:
        rows_t = [r for r in runs if r["seq_len"] == t]
        if not rows_t:
            continue
        ps = sorted({r["num_kv_pairs"] for r in rows_t})
        by = {(r["model"], r["seed"], r["num_kv_pairs"]): r for r in rows_t}
        seed_col = [["seed"], []][len(s["seeds"]) == 1]  # one seed: the table of before
        table = []
        for v, k in dict.fromkeys((r["model"], r["seed"]) for r in rows_t):
            first = next(r for r in rows_t if r["model"] == v and r["seed"] == k)
            cells = []
            for q in ps:
                r = by.get((v, k, q))
                cells.append("" if r is None else (_pct(r["accuracy"]) if r["status"] == "ok"
                                                   else r["status"]))
            table.append([v, *([k] if seed_col else []), first["init"], first["tied"], *cells,
                          f"{first['lr']:g}" if first.get("lr") else "-",
                          first.get("steps", "-"), fmt(first.get("train_seconds"), 0)])
        pad = [""] * len(seed_col)
        table.append(["copy plateau (1/P)", *pad, "", "", *(f"{100 / q:.1f}" for q in ps), "",
                      "", ""])
        reach = {}
        for r in rows_t:
            rf = r.get("receptive_field")
            if r["status"] == "ok" and rf is not None and rf < t:
                reach.setdefault(rf, {})[r["num_kv_pairs"]] = r["reachable_fraction"]
        for rf, vals in sorted(reach.items()):
            table.append([f"reachable (rf {rf})", *pad, "", "",
                          *(_pct(vals.get(q)) for q in ps), "", "", ""])
        parts += ["", f"## T = {t}", "", markdown_table(
            ["model", *seed_col, "init", "tied", *(f"P {q}" for q in ps), "chosen lr", "steps",
             "train s"], table)]
    if results.get("rates"):
        parts += _rates_markdown(results["rates"], s["solved_accuracy"])
    sweep = [[c["model"], c["seq_len"], f"{c['lr']:g}", c["seed"], c["status"],
              _pct(c.get("val_accuracy")),
              " / ".join(_pct(r["accuracy"]) for r in c.get("pairs", {}).values()) or "-",
              c.get("steps", "-"), c.get("stop_reason", "-"),
              fmt(c.get("train_seconds"), 0), fmt(c.get("wall_seconds"), 0),
              "yes" if c.get("chosen") else "", c.get("action", "-")]
             for c in results["configs"]]
    parts += ["", "## Learning-rate sweep (every configuration)", "", markdown_table(
        ["model", "T", "lr", "seed", "status", "val acc (mean)", "test acc per P", "steps", "stop",
         "train s", "wall s", "chosen", "action"], sweep)]
    return "\n".join(parts)


def _rates_markdown(rates: list[dict[str, Any]], threshold: float) -> list[str]:
    rows = [[r["model"], r["seq_len"], r["runs"], r["solved"], _pct(r["rate"]),
             f"{_pct(r['rate_low'])} - {_pct(r['rate_high'])}",
             fmt_pm(*(None if v is None else 100 * v
                      for v in (r["accuracy_mean"], r["accuracy_std"])), digits=1),
             ", ".join(f"{lr}: {c['solved']}/{c['runs']}" for lr, c in
                       r["solved_by_lr"].items()) or "-", r["not_finished"]]
            for r in rates]
    return ["", "## Recall rate over seeds and learning rates", "",
            f"A run (one seed at one lr) is *solved* when every pair count's test accuracy is "
            f">= {100 * threshold:g}% (--solved-accuracy). Rate = solved / finished runs, with "
            f"its Wilson 95% interval; test accuracy = the mean over pair counts of a run, "
            f"mean ± sample std over the finished runs.", "",
            markdown_table(["model", "T", "runs", "solved", "rate (%)", "95% interval (%)",
                            "test acc (%)", "solved per lr", "not finished"], rows)]


def _plot(results: dict[str, Any], path: Path) -> None:
    runs = [r for r in results["runs"] if r["status"] == "ok"]
    seq_lens = sorted({r["seq_len"] for r in runs}) or [0]
    fig, axes = new_figure(len(seq_lens), width=4.5, height=3.8)
    for ax, t in zip(axes, seq_lens, strict=True):
        for model in dict.fromkeys(r["model"] for r in runs):
            by_pairs: dict[int, list[float]] = {}  # over seeds: their mean
            for r in runs:
                if r["model"] == model and r["seq_len"] == t:
                    by_pairs.setdefault(r["num_kv_pairs"], []).append(100 * r["accuracy"])
            if by_pairs:
                ps = sorted(by_pairs)
                ax.plot(ps, [sum(by_pairs[q]) / len(by_pairs[q]) for q in ps], "o-",
                        label=model)
        ps = sorted({r["num_kv_pairs"] for r in runs if r["seq_len"] == t})
        ax.plot(ps, [100 / q for q in ps], "--", color="gray", label="copy plateau (1/P)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("key-value pairs")
        ax.set_title(f"T = {t}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("MQAR test accuracy (%)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    p = results["settings"]["protocol"]
    fig.suptitle(f"multi-query associative recall, d {p['d_model']}, {p['n_layers']} layers, "
                 f"best lr per model and length" + (", mean over seeds"
                                                     if len(results["settings"]["seeds"]) > 1
                                                     else ""))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def write_results(out: Path, results: dict[str, Any], plot: bool = False) -> None:
    s = results["settings"]
    results["runs"] = _summary(results["configs"], s["models"], s["seq_lens"], s["seeds"])
    chosen = {(r["model"], r["seq_len"], r["seed"]): r.get("lr") for r in results["runs"]}
    for c in results["configs"]:
        c["chosen"] = chosen.get((c["model"], c["seq_len"], c["seed"])) == c["lr"]
    several = len(s["seeds"]) > 1 or len(s["lrs"]) > 1
    results["rates"] = recall_rates(results["configs"], s["solved_accuracy"]) if several else []
    results["environment"] = finish_environment(results["environment"])
    clean = json_safe(results)  # strict JSON: NaN/inf -> null
    atomic_write_bytes(out / "results.json",
                       (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / "results.md", (_markdown(clean).rstrip() + "\n").encode())
    if plot:  # once at the end: matplotlib costs more than a quick configuration
        _plot(clean, out / "recall.png")


def _mix(cases: list[list[int]]) -> str:
    if not cases:
        return "Each length trained alone."
    shown = ", ".join(f"{t} x {q}" for t, q in cases)
    return (f"Shorter cases trained beside every longer length (length x pairs, one micro-batch "
            f"per length each step, zoology's original MQAR mixture): {shown}.")


def _query_slots(power_a: float | None) -> str:
    if power_a is None:
        return "uniform over the query region"
    return f"zoology's power law, p(slot i) ~ (i+1)^({power_a:g}-1)"
