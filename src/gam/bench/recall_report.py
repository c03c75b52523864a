"""The outputs of ``gam bench recall``: the summary rows, results.json, results.md and the plot
(written atomically after every configuration, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gam.bench.environment import finish_environment
from gam.bench.reports import environment_markdown, fmt, json_safe, markdown_table, new_figure
from gam.files import atomic_write_bytes


def choose_lr(configs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished configuration with the best mean validation accuracy (ties: fewer steps,
    then the smaller lr); None if none finished."""
    ok = [c for c in configs if c.get("status") == "ok"]
    if not ok:
        return None
    return max(ok, key=lambda c: (round(c["val_accuracy"], 6), -c["steps"], -c["lr"]))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _summary(configs: list[dict[str, Any]], variants: list[str], seq_lens: list[int]
             ) -> list[dict[str, Any]]:
    """One row per (model, length, pairs) at the chosen lr."""
    rows = []
    for t in seq_lens:
        for v in variants:
            group = [c for c in configs if c["model"] == v and c["seq_len"] == t]
            if not group:
                continue
            best = choose_lr(group)
            ref = best or group[-1]
            for q in ref["pairs_trained"]:
                row: dict[str, Any] = {"model": v, "seq_len": t, "num_kv_pairs": q,
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
             f"(model, length) among {s['lrs']} on {p['val_examples']} validation sequences "
             f"per pair count; accuracy on {p['test_examples']} test sequences (other seeds). "
             f"Filler: {'random tokens' if p['random_filler'] else '0'}. Query slots: "
             f"{_query_slots(p.get('query_power_a'))}. {_mix(p.get('mix') or [])} 'copy' = 100/P "
             f"(copying any value of the context); 'reachable (rf r)' = queries whose pair "
             f"lies inside a receptive field of r tokens (GAM's), the most GAM can recall."]
    for t in s["seq_lens"]:
        rows_t = [r for r in runs if r["seq_len"] == t]
        if not rows_t:
            continue
        ps = sorted({r["num_kv_pairs"] for r in rows_t})
        by = {(r["model"], r["num_kv_pairs"]): r for r in rows_t}
        table = []
        for v in dict.fromkeys(r["model"] for r in rows_t):
            first = next(r for r in rows_t if r["model"] == v)
            cells = []
            for q in ps:
                r = by.get((v, q))
                cells.append("" if r is None else (_pct(r["accuracy"]) if r["status"] == "ok"
                                                   else r["status"]))
            table.append([v, first["init"], first["tied"], *cells,
                          f"{first['lr']:g}" if first.get("lr") else "-",
                          first.get("steps", "-"), fmt(first.get("train_seconds"), 0)])
        table.append(["copy plateau (1/P)", "", "", *(f"{100 / q:.1f}" for q in ps), "", "", ""])
        reach = {}
        for r in rows_t:
            rf = r.get("receptive_field")
            if r["status"] == "ok" and rf is not None and rf < t:
                reach.setdefault(rf, {})[r["num_kv_pairs"]] = r["reachable_fraction"]
        for rf, vals in sorted(reach.items()):
            table.append([f"reachable (rf {rf})", "", "", *(_pct(vals.get(q)) for q in ps),
                          "", "", ""])
        parts += ["", f"## T = {t}", "", markdown_table(
            ["model", "init", "tied", *(f"P {q}" for q in ps), "chosen lr", "steps",
             "train s"], table)]
    sweep = [[c["model"], c["seq_len"], f"{c['lr']:g}", c["status"],
              _pct(c.get("val_accuracy")),
              " / ".join(_pct(r["accuracy"]) for r in c.get("pairs", {}).values()) or "-",
              c.get("steps", "-"), c.get("stop_reason", "-"),
              fmt(c.get("train_seconds"), 0), fmt(c.get("wall_seconds"), 0),
              "yes" if c.get("chosen") else "", c.get("action", "-")]
             for c in results["configs"]]
    parts += ["", "## Learning-rate sweep (every configuration)", "", markdown_table(
        ["model", "T", "lr", "status", "val acc (mean)", "test acc per P", "steps", "stop",
         "train s", "wall s", "chosen", "action"], sweep)]
    return "\n".join(parts)


def _plot(results: dict[str, Any], path: Path) -> None:
    runs = [r for r in results["runs"] if r["status"] == "ok"]
    seq_lens = sorted({r["seq_len"] for r in runs}) or [0]
    fig, axes = new_figure(len(seq_lens), width=4.5, height=3.8)
    for ax, t in zip(axes, seq_lens, strict=True):
        for model in dict.fromkeys(r["model"] for r in runs):
            rows = sorted((r for r in runs if r["model"] == model and r["seq_len"] == t),
                          key=lambda r: r["num_kv_pairs"])
            if rows:
                ax.plot([r["num_kv_pairs"] for r in rows], [100 * r["accuracy"] for r in rows],
                        "o-", label=model)
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
                 f"best lr per model and length")
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def write_results(out: Path, results: dict[str, Any], plot: bool = False) -> None:
    s = results["settings"]
    results["runs"] = _summary(results["configs"], s["models"], s["seq_lens"])
    chosen = {}
    for t in s["seq_lens"]:
        for v in s["models"]:
            best = choose_lr([c for c in results["configs"] if c["model"] == v
                              and c["seq_len"] == t])
            if best is not None:
                chosen[(v, t)] = best["lr"]
    for c in results["configs"]:
        c["chosen"] = chosen.get((c["model"], c["seq_len"])) == c["lr"]
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
