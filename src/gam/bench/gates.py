"""``gam bench gates RUN_DIR [RUN_DIR ...]``: what GAM's gates do in a trained model.

For each run folder of a GAM model with gates (``gam train`` / ``gam bench compare`` output):
the model's latest weights and tokenizer are loaded (``gam.training.load_run``), the run's own
validation split is rebuilt exactly as in training (same corpus, row limit, tokenizer and block
length), and ``gam.training.gate_statistics`` runs the model on the first ``--batches``
validation batches: per layer, the mean and standard deviation of ``sigmoid(g_local)`` and
``sigmoid(g_global)`` over every token and channel.

Outputs (in ``--out``): ``results.json`` (per run: the statistics per layer, and the evolution
over training steps that the trainer logs at every evaluation in ``metrics.jsonl``, when
present), ``results.md`` (a table per run: one row per layer), ``gates-<run>.png`` (per-layer
bars of the mean gate values, local vs global, with +-1 std error bars) and
``gates-evolution-<run>.png`` (mean gate value per layer vs training step, one panel for
the local gates and one for the global gates).

A run that is not a GAM (e.g. a Transformer) or a GAM ablation without gates (``gam-sum``,
``gam-global-only``, ``gam-local-only``) is an error (exit status 2), named before any work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from gam.bench import common
from gam.bench.environment import command_line, environment
from gam.bench.reports import environment_markdown, fmt, markdown_table, new_figure, write_results
from gam.models.blocks import block_gate_paths
from gam.models.io import CheckpointError
from gam.models.registry import MODELS, model_from_config, recorded_config
from gam.runtime import autocast_context, resolve_device
from gam.training import RunConfig, gate_statistics, has_gates, load_run, read_metrics
from gam.training.checkpoint import find_checkpoint, read_state
from gam.training.config import DTYPES
from gam.training.data import load_data
from gam.training.diagnostics import gate_paths, gated_blocks
from gam.training.distributed import DistContext
from gam.training.evaluate import first_batches
from gam.training.rundir import read_run_config, safe_filename

STYLES = (("-", "o"), ("--", "s"), (":", "^"))  # per path: line and marker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="training run folders of GAM models with gates")
    parser.add_argument("--batches", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="validation batches to run (default 16; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="blocks per batch (default: the run's evaluation batch size)")
    parser.add_argument("--dtype", choices=("run", *DTYPES), default="run",
                        help="autocast dtype (run: the run's training dtype; fp16 falls back "
                             "to fp32 on a CPU)")
    parser.add_argument("--data-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="where the run's corpus lives now (default: as recorded in the "
                             "run, else $GAM_DATA_DIR / the hub)")
    parser.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="token-id cache (default: $GAM_CACHE_DIR or ~/.cache/gam)")


# -------------------------------------------------------------------------------- checking
def check_gated_run(run_dir: Path) -> dict[str, Any]:
    """The run's config.json if it is a GAM run with gates; ValueError saying why not."""
    config = read_run_config(run_dir)
    model = config.get("model")
    mcfg = config.get("model_config", {})
    try:
        if gated_paths(model, mcfg):
            return config
    except ValueError as err:
        raise ValueError(f"{run_dir}: {err}") from None
    if not isinstance(model, str) or "use_gate" not in mcfg:
        raise ValueError(f"{run_dir} is a {model!r} run: gate statistics need a GAM run "
                         f"(model gam, whose blocks fuse their paths with sigmoid gates)")
    paths = gated_paths(model, {**mcfg, "use_gate": True})
    how = "fuses its paths by a plain sum" if len(paths) > 1 else \
        f"has only its {paths[0] if paths else '?'} path"
    raise ValueError(f"{run_dir} is a {model!r} run without gates (use_gate=False: it "
                     f"{how}); gate statistics need a GAM run with gates (model gam)")


def gated_paths(model: Any, model_config: dict[str, Any]) -> list[str]:
    """The gated paths of a recorded model's blocks ([] without gates or for a name the
    registry does not know), asked of the family itself on a parameter-free copy; ValueError
    when the recorded settings do not build that model."""
    if not isinstance(model, str) or model not in MODELS:
        return []
    try:
        config = recorded_config(model, model_config)
        with torch.device("meta"):
            blocks = model_from_config(model, config).blocks
    except (TypeError, ValueError) as err:
        raise ValueError(f"its model_config does not build a {model!r} model: {err}") from None
    return block_gate_paths(blocks[0]) if len(blocks) else []


# ------------------------------------------------------------------------------- analysis
def evolution(run_dir: Path) -> list[dict[str, Any]]:
    """The gate statistics the trainer logged at every evaluation: ``[{step, gates}, ...]``."""
    return [{"step": r["step"], "gates": r["gates"]}
            for r in read_metrics(run_dir, kind="eval") if r.get("gates")]


def analyse_run(run_dir: Path, config: dict[str, Any], args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    model, tokenizer, config = load_run(run_dir, map_location=device)
    if not has_gates(model):
        raise ValueError(f"{run_dir}: the model has no gated blocks")
    run = RunConfig.from_dict(config)
    data = load_data(run.data, run.tokenizer, DistContext(device=device),
                     cache_dir=getattr(args, "cache_dir", None), tokenizer=tokenizer,
                     splits=("valid",), data_dir=getattr(args, "data_dir", None))
    ids = data.ids["valid"]
    seq_len = run.data.seq_len or model.config.max_seq_len
    batch_size = getattr(args, "batch_size", None) or run.train.eval_batch_size \
        or run.train.batch_size
    n_batches = getattr(args, "batches", None) or (2 if args.quick else 16)
    batches = first_batches(ids, seq_len, batch_size, n_batches)
    if not batches:
        raise ValueError(f"{run_dir}: the validation split has no complete input to run")
    dtype = run.train.dtype if args.dtype == "run" else args.dtype
    if dtype == "fp16" and device.type != "cuda":
        dtype = "fp32"
    with autocast_context(device, dtype):
        layers = gate_statistics(model, batches)
    return {
        "run_dir": str(run_dir),
        "model": config.get("model"),
        "paths": gate_paths(gated_blocks(model)[0][1]),
        "dataset": run.data.dataset,
        "n_layers": int(model.config.n_layers),
        "batches": len(batches),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": dtype,
        "step": _run_step(run_dir),
        "layers": layers,
        "evolution": evolution(run_dir),
    }


def _run_step(run_dir: Path) -> int | None:
    ckpt = find_checkpoint(run_dir)
    return read_state(ckpt).step if ckpt is not None else None


# --------------------------------------------------------------------------------- output
def logged_paths(rows: list[dict[str, Any]]) -> list[str]:
    """The paths that statistics rows name (``<path>_mean``), in order of appearance."""
    paths: list[str] = []
    for row in rows:
        paths += [k[:-5] for k in row if k.endswith("_mean") and k[:-5] not in paths]
    return paths


def run_names(run_dirs: list[Path]) -> list[str]:
    """Short unique names for file names: the folder name, with as many parent folder names
    as needed to tell them apart."""
    parts = [p.resolve().parts for p in run_dirs]
    for depth in range(1, 5):
        names = [safe_filename("-".join(ps[-depth:])) for ps in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i}-{n}" for i, n in enumerate(names)]


def plot_bars(result: dict[str, Any], path: Path, title: str) -> Path:
    fig, (ax,) = new_figure()
    layers = result["layers"]
    xs = list(range(len(layers)))
    paths = result.get("paths") or logged_paths(layers)
    width = 0.76 / len(paths)
    for k, name in enumerate(paths):
        means = [row.get(f"{name}_mean") for row in layers]
        if all(m is None for m in means):
            continue
        stds = [row.get(f"{name}_std") or 0.0 for row in layers]
        offset = (k - (len(paths) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [m if m is not None else 0.0 for m in means], width,
               yerr=stds, capsize=3, label=f"sigmoid(g_{name})", color=f"C{k}")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(row["layer"]) for row in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean gate value (bars: ±1 std)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def plot_evolution(result: dict[str, Any], path: Path, title: str) -> Path | None:
    evo = result["evolution"]
    if not evo:
        return None
    # one panel per path: a layer's local and global means often both sit near 0.5, and on
    # one axes their lines would hide each other; the colour still identifies the layer
    paths = result.get("paths") or logged_paths([g for e in evo for g in e["gates"]])
    fig, axes = new_figure(ncols=len(paths), width=5.0)
    steps = [e["step"] for e in evo]
    n_layers = max(len(e["gates"]) for e in evo)
    styles = dict(zip(paths, STYLES, strict=False))
    for ax, name in zip(axes, paths, strict=True):
        drawn = False
        for layer in range(n_layers):
            ys = [next((g.get(f"{name}_mean") for g in e["gates"] if g.get("layer") == layer),
                       None) for e in evo]
            if all(y is None for y in ys):
                continue
            line, marker = styles[name]
            ax.plot(steps, [y if y is not None else float("nan") for y in ys], line,
                    marker=marker, markersize=4, color=f"C{layer % 10}",
                    label=f"layer {layer}")
            drawn = True
        ax.set_title(f"sigmoid(g_{name})")
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, ncol=2)
        else:
            ax.text(0.5, 0.5, f"no {name} gate logged", ha="center", va="center",
                    transform=ax.transAxes)
    axes[0].set_ylabel("mean gate value (validation batches)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def build_markdown(results: dict[str, Any]) -> str:
    lines = ["# GAM gate statistics", "",
             "Per layer: mean ± std of each path's gate, sigmoid(g_local), sigmoid(g_global) "
             "(and sigmoid(g_delta) for gam-delta), over every token and channel of the first "
             "validation batches (the run's own validation split).", ""]
    for r in results["runs"]:
        lines += [f"## {r['name']}: {r['model']} on {r['dataset']} (step {r['step']})", "",
                  f"Run: `{r['run_dir']}`; {r['batches']} batch(es) of {r['batch_size']} x "
                  f"{r['seq_len']} tokens, {r['dtype']}.", ""]
        rows = []
        paths = r.get("paths") or logged_paths(r["layers"])
        for row in r["layers"]:
            rows.append([row["layer"]]
                        + [fmt(row.get(f"{p}_{s}"), 4) for p in paths
                           for s in ("mean", "std")]
                        + [row.get("tokens")])
        lines.append(markdown_table(
            ["layer"] + [f"{p} {s}" for p in paths for s in ("mean", "std")] + ["tokens"],
            rows))
        lines += ["", f"![gates]({r['bar_png']})"]
        if r.get("evolution_png"):
            lines += ["", f"Evolution over training ({len(r['evolution'])} evaluations): "
                          f"![evolution]({r['evolution_png']})"]
        else:
            lines += ["", "No gate statistics were logged during training (metrics.jsonl)."]
        lines.append("")
    lines.append(environment_markdown(results["environment"], results["command"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
        threads = common.setup_threads(args.threads)
        configs = [check_gated_run(Path(d)) for d in args.run_dirs]
        for opt in ("batches", "batch_size"):
            if getattr(args, opt, 1) < 1:
                raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, opt)}")
    except (ValueError, CheckpointError) as exc:
        print(f"gam bench gates: error: {common.error_text(exc)}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = run_names([Path(d) for d in args.run_dirs])
    runs = []
    for run_dir, config, name in zip(args.run_dirs, configs, names, strict=True):
        try:
            result = analyse_run(Path(run_dir), config, args, device)
        except (ValueError, OSError, CheckpointError) as exc:
            print(f"gam bench gates: error: {common.error_text(exc)}", file=sys.stderr,
                  flush=True)
            return 2
        result["name"] = name
        title = f"{result['model']} on {result['dataset']} (step {result['step']})"
        result["bar_png"] = plot_bars(result, out / f"gates-{name}.png", title).name
        evo = plot_evolution(result, out / f"gates-evolution-{name}.png",
                             f"gate means during training: {title}")
        result["evolution_png"] = evo.name if evo is not None else None
        runs.append(result)
    results = {"runs": runs, "environment": environment(device, threads),
               "command": command_line("gates", getattr(args, "argv", []))}
    markdown = build_markdown(results)
    write_results(out, results, markdown)
    print(markdown)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and the PNGs")
    return 0
