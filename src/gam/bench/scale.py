"""``gam bench scale``: forward+backward time and peak memory of ONE block vs sequence length.

The paper's Table 2: one block of each family at the paper's block hyper-parameters (d 512,
512 memory slots and kernel 3 for GAM, 8 heads for the Transformer, Mamba's d_state 16 / d_conv 4
/ expand 3) on a (batch, N, 512) input that requires grad, in training mode; one measurement is
``y = block(x); y.sum().backward()`` with the gradients set to None before each run. Lengths
256, 512, ..., 8192 by default; models gam, transformer (SDPA attention), transformer-naive
(the paper's materialised T x T attention) and mamba.

Method
------
Every (model, length) runs in a fresh process (``python -m gam.bench.scale --worker ...``):

- the parent kills it after ``--max-seconds`` (status ``timeout``) and records a child killed by
  the OOM killer, or one whose allocation fails, as ``oom``; the run itself never crashes, and
  longer lengths of a model that failed are ``skipped`` (``--no-skip`` tries them anyway);
- peak memory is measured on the first full forward+backward, before the timed runs. GPU:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before (block, input). CPU: the growth of the process's peak resident set size
  (``VmHWM``) over its RSS measured after building the block and the input and after a warm-up
  pass on 16 tokens (which loads kernels and starts threads without allocating much); free heap
  pages are trimmed and the peak counter is reset just before (``MemoryMeter``). A fresh
  process is needed on a CPU because the peak RSS of a process never goes down and because
  memory freed by an earlier, larger configuration stays in the allocator's heap; the CPU
  allocator keeps no cache of its own, so the growth is what the configuration needs:
  activations kept for backward, gradients of the block and the input, temporaries and library
  workspaces. ``peak_mem_mb`` is that growth; ``baseline_mem_mb`` is what was there before;
- on a CPU the worker's address space is capped at ``--max-memory-gb`` above its size (default:
  85% of the memory available when the run starts), so that a too-large configuration fails
  with an allocation error instead of swapping or taking the machine down;
- time: ``--warmup`` untimed runs, then the median and min of ``--repeats`` timed runs, with the
  thread count fixed (``--threads``) and reported. On a CPU the timed runs use the allocator
  settings ``gam train`` uses (``gam.runtime.tune_cpu_allocator``: freed blocks stay in the heap
  instead of being mapped afresh, page fault by page fault, in every run), applied after the
  memory pass, so that the memory column is what the block needs, not what a heap keeps, and
  with at least one untimed run after them; ``allocator_tuned`` says whether they were in force
  (``GAM_MALLOC_TUNING=0``: glibc's defaults, whose fresh mappings of blocks above 32 MiB make
  the time per token grow with N).

The scaling exponent of each model is the least-squares slope of log(time) and log(memory)
against log(N) over its successful lengths (``exponent_time`` from the median times,
``exponent_time_min`` from the min times, which are less sensitive to other load on the machine,
``exponent_memory``), and over its three longest ones (``*_tail``, closer to the asymptotic
order, since a fixed per-token cost dominates short lengths).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from gam.bench import common
from gam.bench.measure import (
    MemoryMeter,
    default_memory_cap,
    limit_address_space,
    loglog_fit,
    time_fn,
)
from gam.bench.reports import (
    environment_markdown,
    fmt,
    markdown_table,
    new_figure,
    save_measured_figure,
    style_log_axis,
)
from gam.bench.workers import emit, merge_worker_result, run_worker, worker_main
from gam.models.registry import build_model, model_config
from gam.runtime import autocast_context, tune_cpu_allocator
from gam.training.argtypes import nonneg_int, nonneg_number, positive_int, positive_number

DEFAULT_MODELS = ["gam", "transformer", "transformer-naive", "mamba"]
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192]
QUICK_LENGTHS = [256, 512, 1024, 2048]
WARMUP_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME",
                        help="build_model names")
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=None, metavar="N",
                        help="explicit sequence lengths (default: 256, 512, ... up to "
                             "--max-len; quick: 256..2048)")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="longest length of the doubling series from 256 (default 8192)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="batch size (default: 4 on CPU, 16 (the paper's) on GPU; quick: 2)")
    common.add_model_preset_argument(parser, "of the block's model")
    parser.add_argument("--d-model", type=positive_int, default=None,
                        help="override d_model (default: the preset's, 512)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per configuration (default 3; quick 2)")
    parser.add_argument("--warmup", type=nonneg_int, default=1, help="untimed runs before timing")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 = torch.autocast(device, dtype=torch.bfloat16), the block's "
                             "weights and input staying fp32 (default: fp32)")
    parser.add_argument("--max-seconds", type=positive_number, default=600.0,
                        help="wall-clock limit per configuration (its own process)")
    parser.add_argument("--max-memory-gb", type=nonneg_number, default=None,
                        help="CPU: cap on a configuration's extra address space (default: "
                             "85%% of available memory); 0 = no cap")
    parser.add_argument("--no-skip", action="store_true",
                        help="also try lengths beyond one that ran out of memory or time")


def lengths_from_args(args: argparse.Namespace) -> list[int]:
    if args.lengths:
        return sorted(set(args.lengths))
    if args.max_len is not None:
        out, n = [], 256
        while n <= args.max_len:
            out.append(n)
            n *= 2
        return out
    return list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)


# ---------------------------------------------------------------------------------- worker
def build_block(name: str, preset: str, seq_len: int, overrides: dict[str, Any]
                ) -> tuple[torch.nn.Module, int]:
    """The first block of a one-layer model of that family (the rest is dropped), and d."""
    model = build_model(name, preset, n_layers=1, max_seq_len=seq_len, **overrides)
    return model.blocks[0], model.config.d_model


def _worker(payload: dict[str, Any]) -> None:
    device = torch.device(payload["device"])
    torch.manual_seed(payload.get("seed", 0))
    n, b = payload["seq_len"], payload["batch_size"]
    block, dim = build_block(payload["model"], payload["preset"], n,
                             payload.get("overrides", {}))
    block = block.to(device).train()
    x = torch.randn(b, n, dim, device=device, requires_grad=True)

    dtype = payload.get("dtype", "fp32")

    def fwd_bwd(inp: torch.Tensor) -> None:
        block.zero_grad(set_to_none=True)
        inp.grad = None
        with autocast_context(device, dtype):
            out = block(inp)
        out.float().sum().backward()

    small = x[:, :min(n, WARMUP_TOKENS)].detach().requires_grad_()
    fwd_bwd(small)
    block.zero_grad(set_to_none=True)
    del small
    if device.type == "cpu":
        limit_address_space(payload.get("max_memory_bytes"))
    meter = MemoryMeter(device)
    meter.start()
    fwd_bwd(x)
    peak = meter.growth_bytes()
    # the memory pass counts as a warm-up, unless the allocator changes after it
    tuned = device.type == "cpu" and tune_cpu_allocator()
    timing = time_fn(lambda: fwd_bwd(x), device,
                     warmup=max(int(tuned), payload["warmup"] - 1), repeats=payload["repeats"])
    emit({
        "status": "ok",
        "time_ms_median": timing["median_ms"],
        "time_ms_min": timing["min_ms"],
        "times_ms": timing["times_ms"],
        "peak_mem_mb": peak / 2**20,
        "baseline_mem_mb": meter.baseline / 2**20,
        "memory_method": meter.method,
        "allocator_tuned": tuned,
        "parameters": sum(p.numel() for p in block.parameters()),
        "d_model": dim,
    })


# ------------------------------------------------------------------------------------ run
def fit_rows(runs: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    fits = []
    for model in models:
        ok = sorted((r for r in runs if r["model"] == model and r["status"] == "ok"),
                    key=lambda r: r["seq_len"])
        lens = [r["seq_len"] for r in ok]
        row: dict[str, Any] = {"model": model, "lengths": lens}
        for key, field in (("time", "time_ms_median"), ("time_min", "time_ms_min"),
                           ("memory", "peak_mem_mb")):
            vals = [r[field] for r in ok]
            full = loglog_fit(lens, vals)
            tail = loglog_fit(lens[-3:], vals[-3:]) if len(lens) > 3 else full
            row[f"exponent_{key}"] = None if full is None else full[0]
            row[f"exponent_{key}_tail"] = None if tail is None else tail[0]
        fits.append(row)
    return fits


def _markdown(results: dict[str, Any]) -> str:
    runs, fits = results["runs"], results["fits"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    lengths = sorted({r["seq_len"] for r in runs})
    by = {(r["model"], r["seq_len"]): r for r in runs}

    def cell(r: dict[str, Any] | None, field: str, digits: int) -> str:
        if r is None:
            return ""
        return fmt(r[field], digits) if r["status"] == "ok" else r["status"]

    s = results["settings"]
    out = [f"# gam bench scale: one block, forward + backward (batch {s['batch_size']}, "
           f"d {s['d_model']}, {s.get('dtype', 'fp32')}, {results['environment']['device']})",
           "",
           environment_markdown(results["environment"], results["command"]), "",
           "## Time (ms, median of repeats)", "",
           markdown_table(["N", *models],
                          [[n, *(cell(by.get((m, n)), "time_ms_median", 1) for m in models)]
                           for n in lengths]), "",
           "## Peak memory (MB, growth over block + input)", "",
           markdown_table(["N", *models],
                          [[n, *(cell(by.get((m, n)), "peak_mem_mb", 1) for m in models)]
                           for n in lengths]), "",
           "## Scaling exponents (least-squares slope of log y vs log N)", "",
           markdown_table(
               ["model", "time (all N)", "time (3 longest)", "min time (all N)",
                "min time (3 longest)", "memory (all N)", "memory (3 longest)",
                "lengths fitted"],
               [[f["model"], fmt(f["exponent_time"], 2),
                 fmt(f["exponent_time_tail"], 2), fmt(f["exponent_time_min"], 2),
                 fmt(f["exponent_time_min_tail"], 2), fmt(f["exponent_memory"], 2),
                 fmt(f["exponent_memory_tail"], 2),
                 f"{f['lengths'][0]}-{f['lengths'][-1]}" if f["lengths"] else "-"]
                for f in fits]), "",
           "## All runs", "",
           markdown_table(
               ["model", "N", "batch", "status", "time median (ms)", "time min (ms)",
                "peak mem (MB)", "note"],
               [[r["model"], r["seq_len"], r["batch_size"], r["status"],
                 fmt(r.get("time_ms_median"), 1), fmt(r.get("time_ms_min"), 1),
                 fmt(r.get("peak_mem_mb"), 1), r.get("error") or ""] for r in runs]), "",
           f"Memory: {s['memory_method']}."]
    return "\n".join(out)


def _plot(results: dict[str, Any], path: Path) -> Path:
    fig, (ax_t, ax_m) = new_figure(2)
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        ok = sorted((r for r in results["runs"] if r["model"] == model and r["status"] == "ok"),
                    key=lambda r: r["seq_len"])
        if not ok:
            continue
        n = [r["seq_len"] for r in ok]
        ax_t.plot(n, [r["time_ms_median"] for r in ok], "o-", label=model)
        ax_m.plot(n, [r["peak_mem_mb"] for r in ok], "o-", label=model)
    for ax, title, unit in ((ax_t, "forward + backward time", "ms"),
                            (ax_m, "peak memory (growth)", "MB")):
        style_log_axis(ax, title, unit, "sequence length N")
    s = results["settings"]
    return save_measured_figure(fig, path, f"one block, batch {s['batch_size']}, d "
                                f"{s['d_model']}, {s.get('dtype', 'fp32')}", results)


def run(args: argparse.Namespace) -> int:
    device, threads, command, env = common.setup(args)
    lengths = lengths_from_args(args)
    batch = args.batch_size or (2 if args.quick else (16 if device.type == "cuda" else 4))
    repeats = args.repeats or (2 if args.quick else 3)
    overrides = {} if args.d_model is None else {"d_model": args.d_model}
    max_mem = default_memory_cap(device, args.max_memory_gb)
    print(f"gam bench scale: models {args.models}, lengths {lengths}, batch {batch}, "
          f"{args.dtype}, {repeats} repeats, device {device}, {threads} threads", flush=True)

    runs: list[dict[str, Any]] = []
    configs: dict[str, Any] = {}
    d_model = None
    for model in args.models:
        reason = common.model_available(model)
        failed_at: tuple[int, str] | None = None
        if reason is None:
            config = model_config(model, args.model_preset, **overrides)
            d_model = config.d_model
            configs[model] = {**config.to_dict(), "n_layers": 1, "max_seq_len": "N"}
        for n in lengths:
            row: dict[str, Any] = {"model": model, "seq_len": n, "batch_size": batch}
            if reason is not None:
                row.update(status="unavailable", error=reason)
            elif failed_at is not None and not args.no_skip:
                row.update(status="skipped",
                           error=f"{failed_at[1]} at N={failed_at[0]}")
            else:
                payload = {"model": model, "preset": args.model_preset, "overrides": overrides,
                           "seq_len": n, "batch_size": batch, "device": str(device),
                           "threads": args.threads, "warmup": args.warmup, "repeats": repeats,
                           "seed": args.seed, "max_memory_bytes": max_mem,
                           "dtype": args.dtype}
                merge_worker_result(row, *run_worker("gam.bench.scale", payload,
                                                     timeout=args.max_seconds))
                if row["status"] in ("oom", "timeout"):
                    failed_at = (n, row["status"])
            row.setdefault("time_ms_median", None)
            row.setdefault("time_ms_min", None)
            row.setdefault("peak_mem_mb", None)
            runs.append(row)
            print(f"  {model:<18} N={n:<6} {row['status']:<8} "
                  f"time {fmt(row['time_ms_median'], 1)} ms "
                  f"(min {fmt(row['time_ms_min'], 1)}), "
                  f"peak {fmt(row['peak_mem_mb'], 1)} MB"
                  + (f"  [{row['error'][:120]}]" if row.get("error") else ""), flush=True)

    fits = fit_rows(runs, list(args.models))
    for f in fits:
        print(f"  fit {f['model']:<18} time ~ N^{fmt(f['exponent_time'], 2)} "
              f"(tail {fmt(f['exponent_time_tail'], 2)}), memory ~ "
              f"N^{fmt(f['exponent_memory'], 2)} "
              f"(tail {fmt(f['exponent_memory_tail'], 2)})", flush=True)
    method = next((r["memory_method"] for r in runs if r.get("memory_method")),
                  "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM growth")
    common.write_measurements(
        args, command, env,
        {"lengths": lengths, "batch_size": batch, "dtype": args.dtype, "d_model": d_model,
         "repeats": repeats, "warmup": args.warmup, "max_memory_bytes": max_mem,
         "memory_method": method, "block_configs": configs,
         "measurement": "y = block(x); y.sum().backward(), x (B, N, d) requires grad, "
                        "training mode, grads set to None before each run"},
        runs, _markdown, _plot, "scale.png", fits=fits)
    return 0

if __name__ == "__main__":
    sys.exit(worker_main(_worker))
