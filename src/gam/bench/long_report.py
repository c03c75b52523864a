"""``gam bench long``'s report: ``results.md`` (loss by position, passkey accuracy by length
and depth, speeds) and the loss-by-position figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gam.bench import training_bench as tb
from gam.bench.long_measure import CONTEXT_USED_Z, context_used, farthest_help
from gam.bench.reports import environment_markdown, fmt, markdown_table, new_figure
from gam.training.rundir import dataset_slug


def bucket_label(bucket: dict[str, Any]) -> str:
    """A position bucket as the report names it (``1-16``)."""
    return f"{bucket['first']:,}-{bucket['last']:,}"


def passkey_summary(cells: list[dict[str, Any]], by: str) -> dict[Any, float | None]:
    """Accuracy per ``length`` or ``depth`` over the cells that ran (None where none did)."""
    out: dict[Any, list[int]] = {}
    for cell in cells:
        tally = out.setdefault(cell[by], [0, 0])
        if cell.get("status") == "ok":
            tally[0] += cell["correct"]
            tally[1] += cell["n"]
    return {k: (c / n if n else None) for k, (c, n) in out.items()}


def bucket_cell(bucket: dict[str, Any] | None) -> str:
    """``5.432 ± 0.031`` (the standard error where measured)."""
    if bucket is None:
        return "-"
    se = bucket.get("se")
    return fmt(bucket["loss"], 3) + (f" ± {se:.3f}" if se is not None else "")


def drop_cell(bucket: dict[str, Any] | None) -> str:
    """``0.123 ± 0.010``: the paired drop from the bucket before (``-`` where not measured)."""
    if bucket is None or bucket.get("drop") is None:
        return "-"
    se = bucket.get("drop_se")
    return f"{bucket['drop']:+.3f}" + (f" ± {se:.3f}" if se is not None else "")


def gain_cell(gain: dict[str, Any] | None) -> str:
    """``+0.0123 ± 0.0008``: a context gain (``-`` where not measured); four decimals, as the
    gains past 64 tokens are tenths of a millinat with smaller errors."""
    if gain is None or gain.get("gain") is None:
        return "-"
    se = gain.get("se")
    return f"{gain['gain']:+.4f}" + (f" ± {se:.4f}" if se is not None else "")


def help_cell(keep: int | None) -> str:
    """The farthest help as a distance: ``> 64`` tokens back, ``none`` (not even 16)."""
    if keep is None:
        return "-"
    return f"> {keep:,}" if keep else "none"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def dataset_markdown(dataset: str, info: dict[str, Any], rows: list[dict[str, Any]]
                     ) -> list[str]:
    """The tables of one corpus's language-modelling runs: perplexity, speed and memory; loss
    by position."""
    lines = []
    if info.get("source"):
        lines += [f"Data: {info['source']}; tokens train / valid: "
                  f"{info['tokens'].get('train', 0):,} / {info['tokens'].get('valid', 0):,}.", ""]
    mine = [r for r in rows if r["dataset"] == dataset and r.get("part", "lm") == "lm"]
    table = [[r["family"], r["T"], tb.fmt_params(r.get("params_total")),
              tb.fmt_params(r.get("params_non_embedding")), fmt(r.get("steps")),
              fmt(r.get("train_tokens")), fmt(r.get("val_ppl"), 2),
              fmt(r.get("tokens_per_s"), 0),
              fmt(r.get("step_tokens_per_s"), 0), fmt(r.get("peak_mem_mb"), 0),
              fmt(r.get("decode_tokens_per_s"), 1),
              r.get("status") if r.get("status") != "ok" else r.get("eval_status", "-")]
             for r in mine]
    lines += ["### Perplexity, speed and memory", "", markdown_table(
        ["family", "T", "params", "non-emb", "steps", "train tokens", "val ppl",
         "train tok/s (run)", "train tok/s (timed steps)", "peak MB (train step)",
         "decode tok/s at T", "status"], table), ""]
    labels = list(dict.fromkeys(bucket_label(b) for r in mine for b in r.get("buckets") or []))
    if labels:
        table, drops = [], []
        for r in mine:
            by = {bucket_label(b): b for b in r.get("buckets") or []}
            used = context_used(r.get("buckets") or [])
            table.append([r["family"], r["T"], *(bucket_cell(by.get(x)) for x in labels),
                          fmt(used)])
            drops.append([r["family"], r["T"], *(drop_cell(by.get(x)) for x in labels[1:])])
        lines += ["### Validation loss by position in the window (nats / token)", "",
                  "Mean loss of the targets at those positions of every window, ± its standard "
                  "error across windows. Context used: the last position of the farthest "
                  f"bucket whose loss is below the bucket before it by more than "
                  f"{CONTEXT_USED_Z:g} standard errors of the paired drop (next table).", "",
                  markdown_table(["family", "T", *labels, "context used"], table), "",
                  "Drop of the loss from the bucket before (nats / token; within each window, "
                  "then the mean over windows ± its standard error; positive: the tokens "
                  "further back help).", "",
                  markdown_table(["family", "T", *labels[1:]], drops), "",
                  f"![loss by position](positions-{dataset_slug(dataset)}.png)", ""]
    keeps = sorted({g["keep"] for r in mine for g in r.get("context_gains") or []})
    if keeps:
        table = []
        for r in mine:
            by_keep = {g["keep"]: g for g in r.get("context_gains") or []}
            table.append([r["family"], r["T"], *(gain_cell(by_keep.get(k)) for k in keeps),
                          help_cell(farthest_help(r.get("context_gains") or []))])
        lines += ["### What the tokens further back are worth (nats / token)", "",
                  "The loss of the same targets (those more than 2k tokens into their window) "
                  "with only their last k+1 to 2k tokens, minus their loss with the whole "
                  "window before them, ± its standard error across windows; positive: the "
                  "tokens further back than about k help (with learned absolute positions the "
                  "target also sits earlier in its chunk than in its window). Farthest help: "
                  f"the largest such k above {CONTEXT_USED_Z:g} standard errors.", "",
                  markdown_table(["family", "T", *(f"k {k:,}" for k in keeps),
                                  "farthest help"], table), "",
                  f"![context gains](gains-{dataset_slug(dataset)}.png)", ""]
    return lines


def passkey_markdown(results: dict[str, Any]) -> list[str]:
    """The passkey runs: how they trained, then accuracy by length and by depth."""
    rows = [r for r in results["runs"] if r.get("part") == "passkey"]
    if not rows:
        return []
    p = results["settings"]["passkey"]
    lines = ["## Passkey retrieval", "",
             f"Passkey runs: every family trained at T = {p['context']:,} on {p['dataset']}, "
             f"{p['batch']} block(s) per step for {p['steps']:,} steps, {100 * p['mix']:g}% "
             f"of the blocks packed with passkey samples (one key per block, lengths "
             f"log-uniform, most of them short; gam.data.passkey), the rest from the corpus.",
             ""]
    table = [[r["family"], r["T"], fmt(r.get("steps")), fmt(r.get("val_ppl"), 2),
              fmt(r.get("tokens_per_s"), 0),
              r.get("status") if r.get("status") != "ok" else r.get("eval_status", "-")]
             for r in rows]
    lines += [markdown_table(["family", "T", "steps", "val ppl (corpus)", "train tok/s",
                              "status"], table), ""]
    cells = [r for r in rows if r.get("passkey")]
    if cells:
        lengths = sorted({c["length"] for r in cells for c in r["passkey"]})
        depths = sorted({c["depth"] for r in cells for c in r["passkey"]})
        table = []
        for r in cells:
            by_len = passkey_summary(r["passkey"], "length")
            by_depth = passkey_summary([c for c in r["passkey"] if c["length"] <= r["T"]],
                                       "depth")
            table.append([r["family"], r["T"], *(pct(by_len.get(x)) for x in lengths),
                          *(pct(by_depth.get(d)) for d in depths)])
        lines += ["### Passkey retrieval accuracy", "",
                  "By context length (over all depths; `-`: not run, e.g. no learned "
                  "position past T), then by depth of the key (over the lengths up to T).",
                  "", markdown_table(
                      ["family", "T", *(f"len {x:,}" for x in lengths),
                       *(f"depth {d:g}" for d in depths)], table), ""]
    return lines


def median_of(values: list[float | None]) -> float | None:
    """The median of the values that were measured (None when none was)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summary_markdown(results: dict[str, Any]) -> list[str]:
    """One row per family over the whole grid: perplexity and context used per corpus and T,
    speeds per T (median over the corpora: they do not depend on the text), passkey
    accuracy up to T and past it."""
    rows = [r for r in results["runs"] if r.get("status") == "ok"]
    lm = [r for r in rows if r.get("part", "lm") == "lm"]
    if not lm:
        return []
    datasets = [d for d in results["datasets_requested"] if any(r["dataset"] == d for r in lm)]
    contexts = sorted({r["T"] for r in lm})
    families = list(dict.fromkeys(r["family"] for r in rows))

    def cells(family: str, t: int, value: Any) -> str:
        out = []
        for d in datasets:
            found = [r for r in lm if (r["family"], r["T"], r["dataset"]) == (family, t, d)]
            out.append(value(found[0]) if found else "-")
        return " / ".join(out)

    passkey = {r["family"]: r for r in rows if r.get("part") == "passkey" and r.get("passkey")}
    table = []
    for f in families:
        mine = [r for r in lm if r["family"] == f]
        row = [f, tb.fmt_params(mine[0].get("params_total")) if mine else "-"]
        row += [cells(f, t, lambda r: fmt(r.get("val_ppl"), 1)) for t in contexts]
        row += [cells(f, t, lambda r: help_cell(farthest_help(r.get("context_gains") or [])))
                for t in contexts]
        row += [" / ".join(fmt(median_of([r.get(key) for r in mine if r["T"] == t]), 0)
                           for t in contexts)
                for key in ("tokens_per_s", "decode_tokens_per_s")]
        pk = passkey.get(f)
        if pk is None:
            row += ["-", "-"]
        else:
            within = [c for c in pk["passkey"]
                      if c["length"] <= pk["T"] and c.get("status") == "ok"]
            n = sum(c["n"] for c in within)
            by_len = passkey_summary(pk["passkey"], "length")
            past = max(by_len) if by_len else None
            row += [pct(sum(c["correct"] for c in within) / n if n else None),
                    f"{pct(by_len[past])} at {past:,}"
                    if past and past > pk["T"] and by_len[past] is not None else "-"]
        table.append(row)
    names = " / ".join(datasets)
    ts = " / ".join(f"{t:,}" for t in contexts)
    return ["## Summary", "",
            f"Per family: validation perplexity and the farthest help (how far back tokens "
            f"still lower the loss; sections below) on {names} at each T; training tokens/s of "
            f"the runs themselves and decode tokens/s at the end of a T-token context (T {ts}; "
            f"median over the corpora); passkey accuracy over the prompts up to the passkey "
            f"runs' T and at the longest length asked.", "",
            markdown_table(["family", "params",
                            *(f"val ppl T {t:,}" for t in contexts),
                            *(f"farthest help T {t:,}" for t in contexts),
                            "train tok/s", "decode tok/s", "passkey up to T",
                            "passkey past T"], table), ""]


def build_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = ["# Long context (gam bench long)", "",
             f"Protocol `{results['protocol']['name']}`: {results['protocol']['description']}. "
             f"Contexts {s['contexts']}, {s['tokens_per_step']:,} tokens per step (batch = "
             f"that / T), seeds {results['seeds']}; passkey prompts: the repeated \"The grass "
             f"is green. The sky is blue. ...\" with the key stated once, "
             f"{s['evaluation']['passkey_samples']} prompts per (length, depth) cell.", ""]
    rows = list(results["runs"])
    lines += summary_markdown(results)
    for dataset in results["datasets_requested"]:
        info = results["datasets"].get(dataset, {})
        head, loaded = tb.dataset_heading(dataset, info)
        lines += head + (dataset_markdown(dataset, info, rows) if loaded else [])
    lines += passkey_markdown(results)
    failed = [r for r in rows if r.get("status") != "ok" or r.get("eval_status") not in
              ("ok", None)]
    if failed:
        lines += ["## Not finished", "", *(
            f"- {r['dataset']} / {r['model']}: {r.get('status')}"
            f"{' / evaluation ' + str(r.get('eval_status')) if r.get('status') == 'ok' else ''}"
            f": {(r.get('error') or r.get('eval_error') or '')[:300]}" for r in failed), ""]
    machines = list(dict.fromkeys(
        ", ".join(f"{k} {v}" for k, v in r["evaluated_on"].items() if v is not None)
        for r in rows if r.get("evaluated_on")))
    if machines:
        lines += ["Configurations read from records were evaluated on (their timed steps, "
                  "decode speed and memory are those machines'; the run's own tok/s, the "
                  "machine that trained it):", "", *(f"- {m}" for m in machines), ""]
    lines += ["train tok/s (run): the run's own training throughput over all its steps; timed "
              "steps and peak MB: training steps at (batch, T) in the evaluation worker (peak "
              "memory growth over the model and optimizer: RSS on a CPU, allocated bytes on a "
              "GPU); decode: median greedy cached step after a T-token context. Loss by "
              "position: a target at position p is predicted from p tokens of its window.", "",
              environment_markdown(results["environment"], results["command"])]
    return "\n".join(lines)


def line_styles(rows: list[dict[str, Any]]) -> Any:
    """A row's (line style, colour) on a figure of ``rows``: a colour per family, a style per
    T."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    contexts = sorted({r["T"] for r in rows})
    styles = ["-", "--", ":", "-."]
    return lambda r: (styles[contexts.index(r["T"]) % len(styles)],
                      f"C{families.index(r['family']) % 10}")


def plot_positions(rows: list[dict[str, Any]], dataset: str, path: Path) -> Path | None:
    """Loss per position bucket, every family (colour) and T (line style) on one figure."""
    mine = [r for r in rows if r["dataset"] == dataset and r.get("buckets")]
    if not mine:
        return None
    fig, (ax,) = new_figure(width=7.0)
    style = line_styles(mine)
    labels: list[str] = []
    for r in mine:
        names = [bucket_label(b) for b in r["buckets"]]
        labels = names if len(names) > len(labels) else labels
        line, colour = style(r)
        ax.plot(range(len(names)), [b["loss"] for b in r["buckets"]],
                line, marker="o", color=colour, label=f"{r['family']} T={r['T']}")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_xlabel("position in the evaluation window (bucket)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"loss by position, {dataset}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_gains(rows: list[dict[str, Any]], dataset: str, path: Path) -> Path | None:
    """Context gain (millinats per token, ± 2 standard errors) against the kept context k,
    every family (colour) and T (line style) on one figure."""
    mine = [r for r in rows if r["dataset"] == dataset and r.get("context_gains")]
    if not mine:
        return None
    fig, (ax,) = new_figure(width=7.0)
    style = line_styles(mine)
    for r in mine:
        gains = [g for g in r["context_gains"] if g.get("gain") is not None]
        line, colour = style(r)
        ax.errorbar([g["keep"] for g in gains], [1000 * g["gain"] for g in gains],
                    yerr=[2000 * (g.get("se") or 0.0) for g in gains], capsize=3, marker="o",
                    linestyle=line, color=colour,
                    label=f"{r['family']} T={r['T']}")
    ax.set_xscale("log", base=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("context kept: the last k+1..2k tokens (k)")
    ax.set_ylabel("loss without the tokens further back (millinats / token)")
    ax.set_title(f"what the tokens further back are worth, {dataset}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)
    return path
