"""A benchmark's outputs: ``results.json`` (strict JSON: NaN/inf -> null), ``results.md``
(Markdown tables and the environment line), PNG figures through matplotlib's object API (no
pyplot state), and the tail every command ends with (:func:`write_report`: write, plot, print).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None and Paths -> str, so that results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def style_log_axis(ax, title: str, unit: str, xlabel: str, logy: bool = True) -> None:
    """The look every length/context plot shares: log2 x, optional log y, grid, legend."""
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def write_results(out_dir: Path | str, results: dict[str, Any], markdown: str) -> Path:
    """Write ``results.json`` (strict JSON) and ``results.md``; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump(json_safe(results), f, indent=2, allow_nan=False)
        f.write("\n")
    (out / "results.md").write_text(markdown.rstrip() + "\n")
    return out


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def group_rows(rows: Iterable[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    """The rows grouped by the values of ``keys``, groups and rows in their first order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def environment_markdown(env: dict[str, Any], command: str) -> str:
    keys = ("date", "device", "gpu", "cpu_model", "cpu_capability", "threads", "torch",
            "git_commit", "load_average", "load_average_end")
    parts = [f"{k}: {env[k]}" for k in keys if env.get(k) is not None]
    return f"Command: `{command}`\n\nEnvironment: " + "; ".join(parts) + "."


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.5):
    """A matplotlib Figure with ``ncols`` axes, without pyplot (no GUI backend, no global
    state); save with ``fig.savefig(path)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_measured_figure(fig: Any, path: Path, title: str, results: dict[str, Any]) -> Path:
    """Save a measuring command's figure, its title followed by the device the numbers were
    measured on (a figure shown alone still says where its times come from)."""
    fig.suptitle(f"{title} ({results['environment']['device']})")
    fig.savefig(path, dpi=120)
    return path


def write_report(out: Path | str, results: dict[str, Any], markdown: Callable[[dict], str],
                 plots: Sequence[Callable[[Path], Path | str | None]] = (),
                 summary: bool = True) -> list[str]:
    """The tail of every benchmark command: draw the ``plots`` (each called with the output
    folder, returning the file it wrote or None), write ``results.json`` and ``results.md``
    and say what was written. ``summary`` (the training benchmarks): the plots are listed in
    ``results["plots"]`` and the Markdown is printed too. Returns the plot file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not summary:  # the numbers first: a plot that fails (no matplotlib) loses nothing
        write_results(out, results, markdown(results))
    paths = [Path(p) for p in (plot(out) for plot in plots) if p is not None]
    names = [p.name for p in paths]
    files = f"{out / 'results.json'}, {out / 'results.md'}"
    if not summary:
        print(f"wrote {', '.join([files, *map(str, paths)])}")
        return names
    results["plots"] = names
    text = markdown(results)
    write_results(out, results, text)
    print(text)
    print(f"\nwrote {files}" + (f" and {', '.join(names)}" if names else ""))
    return names
